"""The cases of a batch: one JSON object a line of the prompts file, each with its own output path.

A line is ``{"image": path, "boxes": [[x0, y0, x1, y1], ...], "points": [[x, y] or [x, y, label], ...],
"slice": k, "box3d": [[x0, y0, z0, x1, y1, z1], ...], "boxes_from": path, "slice_step": k,
"refine_below": d, "id": name}``: 2D boxes and clicks (on a slice of a volume with ``slice``) as
``medfm segment --box/--point``, or 3D boxes and/or a coarse label map's boxes as
``--box3d/--boxes-from``, with ``--slice-step/--refine-below``. Relative paths are taken from the
prompts file's folder. A line that cannot become a case is kept as a `Case` with its ``error`` set,
so the batch reports it as an error row and goes on.

Each mask goes to ``OUT/<id><extension>``: the id is the line's ``id`` (made safe for file names)
or the image's name (with a short prompt hash when the image has several cases); the extension
follows the input (PNG for pictures, NIfTI for volumes, ``.npz`` for the challenge format,
DICOM-SEG for DICOM). Two cases never share an output (names are compared case-insensitively) and
an output never lands on an input: the later case becomes an error row instead.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medfm.errors import InputFileError, MedfmError, PromptError
from medfm.io.readers import ITK_SUFFIXES, NIFTI_SUFFIXES, PHOTO_SUFFIXES
from medfm.prompts import Box, Box3D, Points
from medfm.segment.options import check_volume_options

KEYS = {"image", "boxes", "points", "slice", "box3d", "boxes_from", "slice_step", "refine_below", "id"}
#: keys that enter a case's prompt hash only when given, so that results written before they existed stay done
VOLUME_OPTIONS = {"slice_step", "refine_below"}
RESULTS_NAME = "results.jsonl"


@dataclass
class Case:
    """One line of the prompts file: what to segment, where its mask goes, or why it cannot run."""

    id: str
    line: int
    image: Path | None = None
    boxes: tuple[Box, ...] = ()
    points: Points | None = None
    slice_index: int | None = None
    box3d: tuple[Box3D, ...] = ()
    boxes_from: Path | None = None
    slice_step: int = 1
    refine_below: float | None = None
    output: Path | None = None
    #: the prompt as given (canonical JSON), part of the content hash
    prompt: str = ""
    error: str | None = None

    @property
    def is_volume_case(self) -> bool:
        """3D boxes (given or from a label map): the whole volume is segmented by propagation."""
        return bool(self.box3d) or self.boxes_from is not None


def read_cases(prompts_file: Path, out: Path) -> list[Case]:
    """Every line of ``prompts_file`` as a `Case` (blank lines skipped), outputs assigned under ``out``."""
    try:
        lines = prompts_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputFileError(prompts_file, f"cannot read the prompts file ({error})") from error
    cases = [_parse_line(text, number, prompts_file) for number, text in enumerate(lines, start=1) if text.strip()]
    _assign_outputs(cases, out)
    return cases


def _parse_line(text: str, number: int, prompts_file: Path) -> Case:
    where = f"{prompts_file}:{number}"
    case = Case(id="", line=number, prompt=text.strip())
    try:
        entry = json.loads(text)
        if not isinstance(entry, dict):
            raise PromptError("a line must be one JSON object")
        if entry.get("id") is not None:
            case.id = str(entry["id"])
        unknown = set(entry) - KEYS
        if unknown:
            raise PromptError(f"unknown key(s) {sorted(unknown)}; a line takes {sorted(KEYS)}")
        if not isinstance(entry.get("image"), str):
            raise PromptError('"image" (a path) is required')
        base = prompts_file.parent
        case.image = base / entry["image"]
        case.boxes = tuple(Box(*_numbers(box, 4, "boxes")) for box in _list(entry.get("boxes"), "boxes"))
        case.points = _points(entry.get("points"))
        case.slice_index = _whole(entry.get("slice"), "slice")
        case.box3d = tuple(Box3D(*(int(_whole(v, "box3d")) for v in _numbers(box, 6, "box3d")))
                           for box in _list(entry.get("box3d"), "box3d"))
        case.boxes_from = base / entry["boxes_from"] if entry.get("boxes_from") is not None else None
        if case.is_volume_case and (case.boxes or case.points is not None or case.slice_index is not None):
            raise PromptError("3D boxes segment the whole volume: do not combine them with boxes, points or slice")
        if not case.is_volume_case and not case.boxes and case.points is None:
            raise PromptError("give boxes, points, box3d or boxes_from")
        case.slice_step = 1 if entry.get("slice_step") is None else _whole(entry["slice_step"], "slice_step")
        case.refine_below = entry.get("refine_below")
        check_volume_options(case.slice_step, case.refine_below, case.is_volume_case)
        case.prompt = json.dumps({key: entry.get(key) for key in sorted(KEYS - {"id"}) if key not in VOLUME_OPTIONS or key in entry},
                                 sort_keys=True)
    except json.JSONDecodeError as error:
        case.error = f"{where}: not a JSON object ({error})"
    except (MedfmError, TypeError, ValueError) as error:
        case.error = f"{where}: {error}"
    return case


def _list(value: object, key: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, list) for item in value):
        raise PromptError(f'"{key}" must be a list of lists of numbers')
    return value


def _numbers(values: list, count: int, key: str) -> list[float]:
    if len(values) != count or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise PromptError(f'each of "{key}" takes {count} numbers, got {values}')
    return [float(v) for v in values]


def _whole(value: object, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise PromptError(f'"{key}" takes whole numbers, got {value!r}')
    return int(value)


def _points(value: object) -> Points | None:
    """``[[x, y], ...]`` positive clicks, or ``[[x, y, label], ...]`` with label 1 (positive) or 0."""
    clicks = _list(value, "points")
    if not clicks:
        return None
    if any(len(click) not in (2, 3) for click in clicks):
        raise PromptError(f'each of "points" is [x, y] or [x, y, label], got {clicks}')
    coords = [_numbers(click[:2], 2, "points") for click in clicks]
    labels = [int(click[2]) if len(click) == 3 else 1 for click in clicks]
    return Points(coords, labels)


def output_extension(image: Path) -> str:
    """The mask's file type for an input: the input's own format where medfm writes it."""
    name = image.name.lower()
    if name.endswith(NIFTI_SUFFIXES) or image.suffix.lower() in ITK_SUFFIXES:
        return ".nii.gz"
    if image.suffix.lower() in PHOTO_SUFFIXES:
        return ".png"
    if image.suffix.lower() == ".npz":
        return ".npz"
    return ".dcm"  # a DICOM file, series folder or zip: DICOM-SEG on the same series


def _stem(image: Path) -> str:
    name = image.name
    for suffix in (".nii.gz", *sorted(PHOTO_SUFFIXES | ITK_SUFFIXES | {".nii", ".npz", ".zip", ".dcm"})):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _safe(name: str) -> str:
    """A file-name-safe form of an id: letters, digits, ``.``, ``_``, ``-``; no leading dot."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".") or "case"


def _assign_outputs(cases: list[Case], out: Path) -> None:
    per_image = Counter(case.image for case in cases if case.error is None and not case.id)
    for case in cases:
        if not case.id and case.error is not None:
            case.id = f"line-{case.line}"
        elif not case.id:
            case.id = _stem(case.image)
            if per_image[case.image] > 1:
                case.id += "-" + hashlib.sha256(case.prompt.encode()).hexdigest()[:8]
    inputs = {path.resolve() for case in cases for path in (case.image, case.boxes_from) if path is not None}
    ids: set[str] = set()
    outputs: dict[str, str] = {}
    for case in cases:
        if case.id in ids:
            case.error = case.error or f"line {case.line}: id '{case.id}' is taken by an earlier line; give each case its own id"
            case.id = f"{case.id}@line-{case.line}"  # an error row of its own, never the earlier case's
        ids.add(case.id)
        if case.error is not None:
            continue
        output = out / (_safe(case.id) + output_extension(case.image))
        if output.name.lower() in outputs:
            case.error = f"line {case.line}: output {output.name} would collide with case '{outputs[output.name.lower()]}'; give an id"
        elif output.resolve() in inputs:
            case.error = f"line {case.line}: output {output} would replace an input; choose another --out or id"
        else:
            case.output = output
            outputs[output.name.lower()] = case.id
