"""The four stages of a batch, as plain functions both engines run: read -> encode -> decode -> write.

The unit of work is one input image with all its cases (`ImageWork`), so a file is read and hashed
once and every slice it is prompted on is encoded once; decoding then answers each case from that
embedding (the predictor's ``set_image`` once, ``predict`` many). 3D cases (``box3d``,
``boxes_from``) propagate slice by slice, where each slice's box comes from the previous slice's
mask, so encoding and decoding interleave: they run whole in the encode stage
(`medfm.segment.volume.segment_volume`, as ``medfm segment --box3d`` does).

Each case carries a content hash of the input file's bytes (and of the label map it takes boxes
from), its prompt, and the model's name and weights; a case whose hash matches its last row in
``results.jsonl`` (status ok with the mask present, or an error) is skipped without reading the
image. Every failure of a case is caught here and becomes that case's one-line error.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfm.batch.cases import Case
from medfm.errors import MedfmError, PromptError
from medfm.io import MedicalImage, read_image, write_mask
from medfm.segment.run import label_map_on_grid, predict_prompts, read_label_map
from medfm.segment.volume import VolumePrompt, prompts_from_labels, segment_volume

#: Exceptions that make one case an error row (anything else is a bug and stops the batch).
CASE_ERRORS = (MedfmError, OSError, ValueError, IndexError, RuntimeError, EOFError)


@dataclass
class CaseWork:
    """A case on its way through the stages, and what became of it."""

    case: Case
    digest: str = ""
    status: str = "todo"  # todo -> ok | error | skipped
    error: str | None = None
    volume_prompts: list[VolumePrompt] | None = None
    label_map: np.ndarray | None = None
    scores: list[float] | None = None
    seconds: float = 0.0

    def fail(self, error: BaseException | str) -> None:
        self.status, self.error, self.label_map = "error", str(error), None

    def row(self) -> dict[str, Any]:
        """The case's line in ``results.jsonl``."""
        return {
            "id": self.case.id, "image": None if self.case.image is None else str(self.case.image),
            "output": str(self.case.output) if self.status == "ok" else None, "scores": self.scores,
            "seconds": round(self.seconds, 4), "status": self.status, "error": self.error, "hash": self.digest,
        }


@dataclass
class ImageWork:
    """One input image and its cases; ``embeddings`` (slice -> embedding, geometry) travel from
    encode to decode only."""

    image_path: Path
    cases: list[CaseWork]
    image: MedicalImage | None = None
    embeddings: dict[int | None, tuple[Any, Any]] = field(default_factory=dict)

    def todo(self, volume: bool | None = None) -> list[CaseWork]:
        return [w for w in self.cases if w.status == "todo" and (volume is None or w.case.is_volume_case == volume)]


def group_by_image(cases: list[Case]) -> list[ImageWork]:
    """The runnable cases grouped by their image, in the order of the prompts file."""
    groups: dict[Path, ImageWork] = {}
    for case in cases:
        groups.setdefault(case.image, ImageWork(case.image, [])).cases.append(CaseWork(case))
    return list(groups.values())


def digest_of(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (relative names and bytes, sorted); a
    marker for a missing or unreadable path, so that its case is redone once the file is there."""
    digest = hashlib.sha256()
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
            with open(file, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    except OSError as error:
        return f"unreadable:{type(error).__name__}"
    return digest.hexdigest()


def is_done(previous: Mapping[str, Mapping[str, Any]], case_id: str, digest: str, retry_errors: bool) -> bool:
    """Whether the last row of a case already answers this very input, prompt and model."""
    row = previous.get(case_id)
    if row is None or row.get("hash") != digest:
        return False
    if row.get("status") == "ok":
        return row.get("output") is not None and Path(row["output"]).is_file()
    return row.get("status") == "error" and not retry_errors


def read_stage(work: ImageWork, previous: Mapping[str, Mapping[str, Any]], model_fingerprint: str,
               retry_errors: bool = False) -> ImageWork:
    """Hash the input, skip the cases already done, read the image once and check every prompt
    against it (before any encoding)."""
    started = time.perf_counter()
    image_digest = file_digest(work.image_path)
    for item in work.cases:
        case = item.case
        label_digest = "" if case.boxes_from is None else file_digest(case.boxes_from)
        item.digest = digest_of(image_digest, label_digest, case.prompt, model_fingerprint)
        if is_done(previous, case.id, item.digest, retry_errors):
            item.status = "skipped"
    todo = work.todo()
    if todo:
        try:
            work.image = read_image(work.image_path)
        except CASE_ERRORS as error:
            for item in todo:
                item.fail(error)
        for item in work.todo():
            try:
                _check_case(item, work.image)
            except CASE_ERRORS as error:
                item.fail(error)
    _share(time.perf_counter() - started, todo)
    return work


def _check_case(item: CaseWork, image: MedicalImage) -> None:
    case = item.case
    where = f"{case.image} (line {case.line})"
    if case.is_volume_case:
        if not image.is_volume:
            raise PromptError(f"{where}: 3D boxes need a volume; this image is 2D")
        prompts = [VolumePrompt(box, label) for label, box in enumerate(case.box3d, start=1)]
        if case.boxes_from is not None:
            prompts += prompts_from_labels(read_label_map(case.boxes_from, image))
        for prompt in prompts:
            try:
                prompt.box.check_inside(image.spatial_shape)
            except PromptError as error:
                raise PromptError(f"{where}: {error}") from error
        item.volume_prompts = prompts
        return
    if not case.boxes and case.points is None:
        raise PromptError(f"{where}: give at least one box or point")
    if len(case.boxes) > 1 and case.points is not None:
        raise PromptError(f"{where}: clicks refine one box: give a single box with points, or boxes alone")
    if image.is_volume:
        depth = image.spatial_shape[0]
        if case.slice_index is None or not 0 <= case.slice_index < depth:
            raise PromptError(f"{where}: a volume needs \"slice\" in 0..{depth - 1}, got {case.slice_index}")
    elif case.slice_index not in (None, 0):
        raise PromptError(f"{where}: \"slice\" only applies to volumes")
    height, width = image.spatial_shape[-2:]
    try:
        for box in case.boxes:
            box.check_area()
            box.check_inside(height, width)
        if case.points is not None:
            case.points.check_inside(height, width)
    except PromptError as error:
        raise PromptError(f"{where}: {error}") from error


def encode_stage(work: ImageWork, predictor: Any) -> ImageWork:
    """Encode each prompted slice once (embeddings kept on the CPU for the decode stage); run the
    3D cases whole."""
    for item in work.todo(volume=True):
        started = time.perf_counter()
        try:
            item.label_map = segment_volume(predictor, work.image, item.volume_prompts, slice_step=item.case.slice_step,
                                            refine_below=item.case.refine_below).label_map
        except CASE_ERRORS as error:
            item.fail(error)
        item.seconds += time.perf_counter() - started
        item.volume_prompts = None
    for slice_index in dict.fromkeys(item.case.slice_index for item in work.todo(volume=False)):
        sharing = [item for item in work.todo(volume=False) if item.case.slice_index == slice_index]
        started = time.perf_counter()
        try:
            predictor.set_image(work.image, slice_index=slice_index)
            work.embeddings[slice_index] = (predictor.embedding.cpu(), predictor.geometry)
        except CASE_ERRORS as error:
            for item in sharing:
                item.fail(error)
        _share(time.perf_counter() - started, sharing)
    return work


def decode_stage(work: ImageWork, predictor: Any) -> ImageWork:
    """Answer every 2D case from its slice's embedding: the decoder only."""
    for item in work.todo(volume=False):
        started = time.perf_counter()
        try:
            embedding, geometry = work.embeddings[item.case.slice_index]
            predictor.use_embedding(embedding.to(predictor.device), geometry)
            prediction = predict_prompts(predictor, item.case.boxes, item.case.points)
            item.label_map = label_map_on_grid(prediction, work.image, item.case.slice_index)
            item.scores = [round(float(s), 4) for s in prediction.scores]
        except CASE_ERRORS as error:
            item.fail(error)
        item.seconds += time.perf_counter() - started
    work.embeddings = {}
    return work


def write_stage(work: ImageWork) -> ImageWork:
    """Write each mask on the input's grid (atomically, never over an input) and let the image go."""
    for item in work.todo():
        started = time.perf_counter()
        try:
            write_mask(item.label_map, item.case.output, like=work.image)
            item.status = "ok"
        except CASE_ERRORS as error:
            item.fail(error)
        item.label_map = None
        item.seconds += time.perf_counter() - started
    work.image = None
    return work


def run_stages(work: ImageWork, predictor_of: Callable[[], Any], previous: Mapping[str, Mapping[str, Any]],
               model_fingerprint: str, retry_errors: bool = False) -> ImageWork:
    """All four stages on one image in this process (the local engine); the model is only asked
    for (``predictor_of``) when a case needs it."""
    work = read_stage(work, previous, model_fingerprint, retry_errors)
    if work.todo():
        predictor = predictor_of()
        work = decode_stage(encode_stage(work, predictor), predictor)
    return write_stage(work)


def _share(seconds: float, items: list[CaseWork]) -> None:
    """Spread the time of a step done once for several cases evenly over them."""
    for item in items:
        item.seconds += seconds / len(items)
