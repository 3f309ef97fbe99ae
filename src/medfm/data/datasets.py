"""Evaluation datasets: find (image, mask) cases on disk, with modality, label names and patient keys.

`discover_cases` recognises four layouts and returns `Case` records in a deterministic order
(sorted by dataset, then case id):

1. medfm's folder layout: ``<root>/images/<id>.<ext>`` + ``<root>/masks/<id>.png`` (``.nii.gz`` for
   volumes). A ``cases.csv`` beside them (column ``id``) may give a patient/group key per case;
   a ``manifest.json`` in the parent folder that lists the dataset gives modality and label names.
2. A collection: ``<root>/manifest.json`` (optional) + one sub-folder per dataset, each in layout 1
   or 3 (as the project's ``shared/data/seg``). The manifest's ``datasets`` entries give
   ``modality`` (free text, normalised by `normalise_modality`), ``target_structures`` (label
   names) and, for 3D sets, a ``cases`` list with a modality and labels per case.
3. nnU-Net raw: ``<root>/dataset.json`` + ``imagesTr/<case>_0000<ending>`` +
   ``labelsTr/<case><ending>`` (v1 or v2 ``dataset.json``). Multi-channel cases (``_0001`` ...)
   use channel 0 only (its modality is ``channel_names["0"]``); the other channels are ignored.
   Files in ``imagesTr`` without a ``_NNNN`` channel suffix (Medical Segmentation Decathlon
   style) are single-channel cases named as their label. ``imagesTs`` has no labels and is not
   read. Region labels of nnU-Net v2 (a list of values under one name) get no name.
4. 3D volumes: layout 1 with ``.nii.gz`` images and masks (``is_volume`` is True).

Anything that does not fit (a folder in none of these layouts, an image without a mask, a mask
without an image, two images with the same id) raises `medfm.errors.InputFileError` naming the
folder or file. `split_cases` then splits the cases per dataset, by patient where one is known.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from medfm.errors import InputFileError

__all__ = ["Case", "discover_cases", "normalise_modality", "split_cases"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_SUFFIXES = (".nii.gz", ".nii", ".png", ".tif", ".tiff", ".bmp")
VOLUME_SUFFIXES = (".nii.gz", ".nii")
LOSSY_SUFFIXES = (".jpg", ".jpeg")

#: cases.csv columns that hold a patient or group key, most specific first.
PATIENT_COLUMNS = ("patient", "patient_id", "patientid", "metadata_patientid", "subject", "subject_id",
                   "group", "subject_prefix", "slide")


@dataclass(frozen=True)
class Case:
    """One evaluation case: an image, its ground-truth label map and what is known about them."""

    dataset: str  #: dataset name (folder name, or dataset.json 'name')
    case_id: str
    image_path: Path
    mask_path: Path
    modality: str | None  #: normalised: "CT", "MR", "X-ray", "ultrasound", "fundus", ... or None
    label_names: dict[int, str] = field(default_factory=dict)  #: foreground label -> name ({} if unknown)
    is_volume: bool = False
    patient: str | None = None  #: patient/group key when the source gives one, else None


# --------------------------------------------------------------------------------------------------
# modality names


_EXACT_MODALITIES = {
    "ct": "CT", "cta": "CT", "ncct": "CT", "cect": "CT",
    "mr": "MR", "mri": "MR", "t1": "MR", "t1w": "MR", "t1c": "MR", "t1ce": "MR", "t1gd": "MR", "t2": "MR",
    "t2w": "MR", "flair": "MR", "adc": "MR", "dwi": "MR", "pd": "MR", "cine": "MR", "b0": "MR",
    "xray": "X-ray", "x-ray": "X-ray", "cr": "X-ray", "dx": "X-ray", "cxr": "X-ray", "xa": "X-ray",
    "us": "ultrasound", "pet": "PET", "pt": "PET", "mg": "mammography", "oct": "OCT",
}
# (pattern, normalised name): searched in the text; the earliest match wins when only one
# modality is named outside parentheses.
_MODALITY_PATTERNS = (
    (r"\bCT\b|computed tomograph", "CT"),
    (r"\bMRI?\b|magnetic resonance|\bT[12]-?W", "MR"),
    (r"mammogra", "mammography"),
    (r"x-?ray|radiograph|\bCXR\b|fluoroscop", "X-ray"),
    (r"ultraso|sonograph|echocardiogra|\bB-mode\b", "ultrasound"),
    (r"endoscop|colonoscop|gastroscop|laparoscop|cystoscop", "endoscopy"),
    (r"dermoscop|dermatoscop", "dermoscopy"),
    (r"\bOCT\b|optical coherence", "OCT"),
    (r"fundus|retinal photo", "fundus"),
    (r"histopatholog|histolog|\bH&E\b|whole[- ]slide|patholog", "histopathology"),
    (r"microscop", "microscopy"),
    (r"\bPET\b|positron", "PET"),
)


def normalise_modality(text: str | None) -> str | None:
    """Map free text ("ultrasound (breast)", "MRI (brain ...)", "T2", "X-ray coronary angiography")
    to medfm's short vocabulary: "CT", "MR", "X-ray", "ultrasound", "endoscopy", "dermoscopy",
    "fundus", "histopathology", "microscopy", "PET", "OCT", "mammography"; None when the text
    names no modality or several ("CT and MRI 3D volumes").

    Only the text outside parentheses decides when it names a modality, so "histopathology (... 40x
    tiles)" and "microscopy (serial-section electron microscopy)" stay what they lead with.
    """
    if not text or not str(text).strip():
        return None
    text = str(text).strip()
    exact = _EXACT_MODALITIES.get(text.lower())
    if exact:
        return exact
    head = re.sub(r"\([^)]*\)", " ", text)
    for candidate in (head, text):
        found: dict[str, int] = {}
        for pattern, name in _MODALITY_PATTERNS:
            match = re.search(pattern, candidate, flags=re.IGNORECASE)
            if match and (name not in found or match.start() < found[name]):
                found[name] = match.start()
        if len(found) == 1:
            return next(iter(found))
        if len(found) > 1:
            if candidate is head:
                return None  # "CT and MRI ...": a mixed set, the cases must say
            return min(found, key=found.__getitem__)
    return None


# --------------------------------------------------------------------------------------------------
# discovery


def discover_cases(
    root: str | PathLike[str],
    datasets: Sequence[str] | None = None,
    limit_per_dataset: int | None = None,
) -> list[Case]:
    """Every (image, mask) case under ``root``, sorted by dataset then case id.

    ``root`` is one dataset folder (medfm layout or nnU-Net raw) or a collection of them (see the
    module docstring). ``datasets`` keeps only the named datasets (an unknown name is an
    `InputFileError` listing the ones found); ``limit_per_dataset`` keeps the first N cases of
    each dataset in that order.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputFileError(root, "no such folder" if not root.exists() else "is not a folder of evaluation data")
    if limit_per_dataset is not None and limit_per_dataset < 0:
        raise ValueError(f"limit_per_dataset must be >= 0, got {limit_per_dataset}")

    if _is_nnunet(root) or _is_folder_layout(root):
        found = {_dataset_name(root): lambda: _read_dataset(root, _parent_manifest_entry(root))}
    else:
        found = _collection(root)

    wanted = list(found) if datasets is None else list(dict.fromkeys(datasets))
    unknown = [name for name in wanted if name not in found]
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise InputFileError(root, f"no dataset named {names}; found: {', '.join(sorted(found))}")

    cases: list[Case] = []
    for name in sorted(wanted):
        dataset_cases = sorted(found[name](), key=lambda case: case.case_id)
        if limit_per_dataset is not None:
            dataset_cases = dataset_cases[:limit_per_dataset]
        cases.extend(dataset_cases)
    return cases


def _is_nnunet(folder: Path) -> bool:
    return (folder / "dataset.json").is_file() and (folder / "imagesTr").is_dir()


def _is_folder_layout(folder: Path) -> bool:
    return (folder / "images").is_dir() or (folder / "masks").is_dir()


def _dataset_name(folder: Path) -> str:
    if _is_nnunet(folder):
        name = _load_json(folder / "dataset.json").get("name")
        if isinstance(name, str) and name.strip():
            return name.strip()
    return folder.name


def _collection(root: Path) -> dict[str, Any]:
    manifest_path = root / "manifest.json"
    entries: dict[str, dict] = {}
    if manifest_path.is_file():
        manifest = _load_json(manifest_path)
        listed = manifest.get("datasets") if isinstance(manifest, dict) else None
        if not isinstance(listed, list):
            raise InputFileError(manifest_path, "has no 'datasets' list")
        for entry in listed:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise InputFileError(manifest_path, f"a 'datasets' entry has no name: {str(entry)[:80]}")
            entries[entry["name"]] = entry
        missing = [name for name in entries if not (root / name).is_dir()]
        if missing:
            raise InputFileError(root, f"manifest.json lists dataset folder(s) that are absent: {', '.join(missing)}")

    found: dict[str, Any] = {}
    for folder in sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")):
        if not (_is_nnunet(folder) or _is_folder_layout(folder)):
            if folder.name in entries:
                raise InputFileError(folder, "is listed in manifest.json but has neither images/ + masks/ "
                                             "nor dataset.json + imagesTr/ + labelsTr/")
            continue  # not a dataset (docs, a cache ...)
        name = _dataset_name(folder)
        if name in found:
            raise InputFileError(folder, f"a second dataset is named '{name}' in {root}")
        entry = entries.get(folder.name)
        found[name] = lambda folder=folder, entry=entry: _read_dataset(folder, entry)
    if not found:
        raise InputFileError(
            root,
            "holds no evaluation data medfm recognises: expected images/ + masks/ (medfm layout), "
            "dataset.json + imagesTr/ + labelsTr/ (nnU-Net raw), or sub-folders in one of these layouts "
            "(a collection, optionally with manifest.json)",
        )
    return found


def _parent_manifest_entry(folder: Path) -> dict | None:
    """The entry for ``folder`` in ``folder/../manifest.json``, when the folder is part of a collection."""
    manifest_path = folder.resolve().parent / "manifest.json"
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # someone else's file: reading one dataset does not depend on it
    listed = manifest.get("datasets") if isinstance(manifest, dict) else None
    for entry in listed if isinstance(listed, list) else []:
        if isinstance(entry, dict) and entry.get("name") == folder.resolve().name:
            return entry
    return None


def _read_dataset(folder: Path, entry: dict | None) -> list[Case]:
    if _is_nnunet(folder):
        return _read_nnunet(folder)
    return _read_folder_layout(folder, entry or {})


# --- layout 1 / 4: images/ + masks/ ----------------------------------------------------------------


def _split_suffix(name: str, suffixes: Iterable[str]) -> tuple[str, str] | None:
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return None


def _files_by_id(folder: Path, suffixes: tuple[str, ...], kind: str) -> dict[str, Path]:
    by_id: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        split = _split_suffix(path.name, suffixes)
        if split is None:
            if kind == "mask" and _split_suffix(path.name, LOSSY_SUFFIXES):
                raise InputFileError(path, "a JPEG mask is lossy and not a label map; save masks as PNG or NIfTI")
            raise InputFileError(path, f"is not a supported {kind} file ({', '.join(suffixes)})")
        case_id = split[0]
        if case_id in by_id:
            raise InputFileError(path, f"two {kind}s have the id '{case_id}': {by_id[case_id].name} and {path.name}")
        by_id[case_id] = path
    return by_id


def _read_folder_layout(folder: Path, entry: dict) -> list[Case]:
    images_dir, masks_dir = folder / "images", folder / "masks"
    for needed in (images_dir, masks_dir):
        if not needed.is_dir():
            raise InputFileError(
                folder, f"has no {needed.name}/ folder: the medfm layout is images/<id>.<ext> + masks/<id>.png"
            )
    images = _files_by_id(images_dir, IMAGE_SUFFIXES, "image")
    masks = _files_by_id(masks_dir, MASK_SUFFIXES, "mask")
    _check_pairs(images, masks, masks_dir, images_dir)

    name = folder.name
    dataset_modality = normalise_modality(entry.get("modality"))
    dataset_labels = _label_names(entry.get("target_structures") or entry.get("labels") or {}, folder)
    per_case = {c["id"]: c for c in entry.get("cases", []) if isinstance(c, dict) and "id" in c}
    rows = _cases_csv(folder / "cases.csv")
    patient_column = _patient_column(rows)
    label_column = "label" if rows and "label" in next(iter(rows.values())) and dataset_labels else None

    cases = []
    for case_id, image_path in images.items():
        row = rows.get(case_id, {}) if rows else {}
        modality, labels = dataset_modality, dataset_labels
        if case_id in per_case:  # a 3D set lists modality and labels per case
            modality = normalise_modality(per_case[case_id].get("modality")) or modality
            if per_case[case_id].get("labels"):
                labels = _label_names(per_case[case_id]["labels"], folder)
        if label_column and str(row.get(label_column, "")).strip().isdigit():
            # a mixed set: each image annotates exactly one class; the others may be present but unlabelled
            value = int(row[label_column])
            if value in dataset_labels:
                labels = {value: dataset_labels[value]}
        patient = ((row.get(patient_column) or "").strip() or None) if patient_column else None
        cases.append(Case(
            dataset=name,
            case_id=case_id,
            image_path=image_path,
            mask_path=masks[case_id],
            modality=modality,
            label_names=dict(labels),
            is_volume=image_path.name.lower().endswith(VOLUME_SUFFIXES),
            patient=patient,
        ))
    return cases


def _check_pairs(images: dict[str, Path], masks: dict[str, Path], masks_dir: Path, images_dir: Path) -> None:
    no_mask = [path for case_id, path in images.items() if case_id not in masks]
    if no_mask:
        more = f" (and {len(no_mask) - 1} more)" if len(no_mask) > 1 else ""
        raise InputFileError(no_mask[0], f"image has no mask in {masks_dir}{more}")
    no_image = [path for case_id, path in masks.items() if case_id not in images]
    if no_image:
        more = f" (and {len(no_image) - 1} more)" if len(no_image) > 1 else ""
        raise InputFileError(no_image[0], f"mask has no image in {images_dir}{more}")
    if not images:
        raise InputFileError(images_dir, "holds no images")


def _label_names(mapping: dict, source: Path) -> dict[int, str]:
    """``{"1": "liver"}`` -> ``{1: "liver"}``, background (0) left out."""
    names: dict[int, str] = {}
    for key, value in mapping.items():
        try:
            label = int(key)
        except (TypeError, ValueError):
            raise InputFileError(source, f"label key {key!r} is not an integer") from None
        if label != 0:
            names[label] = str(value)
    return dict(sorted(names.items()))


def _cases_csv(path: Path) -> dict[str, dict[str, str]] | None:
    if not path.is_file():
        return None
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "id" not in reader.fieldnames:
                raise InputFileError(path, f"has no 'id' column (columns: {reader.fieldnames})")
            return {row["id"]: row for row in reader if row.get("id")}
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputFileError(path, f"cannot be read as CSV: {error}") from None


def _patient_column(rows: dict[str, dict[str, str]] | None) -> str | None:
    if not rows:
        return None
    columns = {name.lower(): name for name in next(iter(rows.values()))}
    for candidate in PATIENT_COLUMNS:
        if candidate in columns:
            return columns[candidate]
    return None


# --- layout 3: nnU-Net raw ---------------------------------------------------------------------------


def _read_nnunet(folder: Path) -> list[Case]:
    spec_path = folder / "dataset.json"
    spec = _load_json(spec_path)
    if not isinstance(spec, dict):
        raise InputFileError(spec_path, "is not a JSON object")
    labels_dir, images_dir = folder / "labelsTr", folder / "imagesTr"
    if not labels_dir.is_dir():
        raise InputFileError(folder, "has dataset.json and imagesTr/ but no labelsTr/ folder")
    ending = spec.get("file_ending") or ".nii.gz"
    name = _dataset_name(folder)

    channels = spec.get("channel_names") or spec.get("modality") or {}
    modality = normalise_modality(str(channels.get("0", channels.get(0, "")))) if isinstance(channels, dict) else None
    label_names = _nnunet_labels(spec.get("labels") or {}, spec_path)

    by_case: dict[str, dict[int | None, Path]] = {}
    for path in sorted(images_dir.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if not path.name.endswith(ending):
            raise InputFileError(path, f"does not end with the dataset's file_ending '{ending}'")
        stem = path.name[: -len(ending)]
        match = re.fullmatch(r"(.+)_(\d{4})", stem)
        case_id, channel = (match.group(1), int(match.group(2))) if match else (stem, None)
        by_case.setdefault(case_id, {})[channel] = path
    images: dict[str, Path] = {}
    for case_id, files in by_case.items():
        if None in files and len(files) > 1:
            raise InputFileError(
                files[None], f"case '{case_id}' has files both with and without a _NNNN channel suffix"
            )
        if None not in files and 0 not in files:
            raise InputFileError(images_dir, f"case '{case_id}' has channels {sorted(files)} but no _0000 file")
        images[case_id] = files[None] if None in files else files[0]

    masks: dict[str, Path] = {}
    for path in sorted(labels_dir.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if not path.name.endswith(ending):
            raise InputFileError(path, f"does not end with the dataset's file_ending '{ending}'")
        masks[path.name[: -len(ending)]] = path
    _check_pairs(images, masks, labels_dir, images_dir)

    return [
        Case(
            dataset=name,
            case_id=case_id,
            image_path=image_path,
            mask_path=masks[case_id],
            modality=modality,
            label_names=dict(label_names),
            is_volume=ending.lower() in VOLUME_SUFFIXES,
            patient=None,
        )
        for case_id, image_path in images.items()
    ]


def _nnunet_labels(mapping: dict, source: Path) -> dict[int, str]:
    """v2 ``{"background": 0, "liver": 1}`` or v1 ``{"0": "background", "1": "liver"}`` -> ``{1: "liver"}``."""
    names: dict[int, str] = {}
    for key, value in mapping.items():
        if isinstance(value, bool):
            raise InputFileError(source, f"label {key!r} has a non-integer value {value!r}")
        if isinstance(value, int):  # v2: name -> value
            label, name = value, str(key)
        elif isinstance(value, (list, tuple)):  # v2 region (several values under one name): no single label
            continue
        elif isinstance(value, str) and re.fullmatch(r"\d+", str(key)):  # v1: "value" -> name
            label, name = int(key), value
        elif isinstance(value, str) and re.fullmatch(r"\d+", value):  # v2 written with string values
            label, name = int(value), str(key)
        else:
            raise InputFileError(
                source, f"cannot read label {key!r}: {value!r} as v1 (value -> name) or v2 (name -> value)"
            )
        if label != 0:
            names[label] = name
    return dict(sorted(names.items()))


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise InputFileError(path, f"cannot be read: {error}") from None
    except ValueError as error:
        raise InputFileError(path, f"is not valid JSON: {error}") from None


# --------------------------------------------------------------------------------------------------
# splitting


def split_cases(
    cases: Sequence[Case], validation_fraction: float = 0.2, seed: int = 0, min_validation: int = 0
) -> tuple[list[Case], list[Case]]:
    """Split into (train, validation), per dataset, by patient where ``patient`` is known.

    Cases sharing a ``patient`` key (within a dataset) always land on the same side; a case with
    no key is its own group. Groups are ordered by a hash of (seed, dataset, group key), so the
    split does not depend on the order of ``cases`` and adding one patient does not move the
    others, then taken into validation while that brings its case count closer to the target:
    ``validation_fraction * n``, raised to ``min_validation`` cases (but never above half of the
    dataset) so that small datasets are not judged on one case. A dataset whose cases all share
    one key (one subject) thus gets no validation case. Both lists keep the input order.
    """
    if not 0.0 <= validation_fraction <= 1.0:
        raise ValueError(f"validation_fraction must lie in [0, 1], got {validation_fraction}")
    if min_validation < 0:
        raise ValueError(f"min_validation must be >= 0, got {min_validation}")
    by_dataset: dict[str, dict[str, list[int]]] = {}
    for index, case in enumerate(cases):
        key = f"patient:{case.patient}" if case.patient is not None else f"case:{case.case_id}"
        by_dataset.setdefault(case.dataset, {}).setdefault(key, []).append(index)

    validation: set[int] = set()
    for dataset, groups in by_dataset.items():
        total = sum(len(members) for members in groups.values())
        target = max(validation_fraction * total, min(min_validation, total // 2))
        order = sorted(groups, key=lambda key: hashlib.sha256(f"{seed}\0{dataset}\0{key}".encode()).hexdigest())
        taken = 0
        for key in order:
            size = len(groups[key])
            if abs(taken + size - target) < abs(taken - target):
                validation.update(groups[key])
                taken += size
    train = [case for index, case in enumerate(cases) if index not in validation]
    valid = [case for index, case in enumerate(cases) if index in validation]
    return train, valid
