"""Writers: masks go out on exactly the input's grid, atomically, and never over an input.

``write_mask(mask, path, like=image)`` picks the format from the output's extension: PNG, NIfTI
(the input's affine), the challenge ``.npz`` (``segs``), or DICOM-SEG (``.dcm``, optional extra
``dicom-seg``) referencing the source series.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from os import PathLike
from pathlib import Path

import numpy as np

from medfm.errors import MissingDependencyError, OutputFileError
from medfm.io.image import MedicalImage
from medfm.io.outputs import TEMPORARY_MARK, same_file
from medfm.io.readers import NIFTI_SUFFIXES, ras_affine


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file is ``.NAME.medfm-tmp-<pid>-<token><suffix>`` (`TEMPORARY_MARK`), so one
    left by a killed process is recognisable; on any failure, interruption included, it is removed.
    It keeps the output's suffix, which writers such as nibabel's go by.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix
    temporary = path.parent / f".{path.name}{TEMPORARY_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix}"
    try:
        os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask gives the usual mode
    except OSError as error:
        raise OutputFileError(path, f"cannot create a file in {path.parent} ({error.strerror})") from error
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def protected_paths(image: MedicalImage | None) -> set[Path]:
    """The files an image was read from: outputs must never replace them."""
    if image is None:
        return set()
    paths = [image.path] if image.path else []
    paths += [Path(p) for p in image.metadata.get("source_files", [])]
    return {p.resolve() for p in paths}


def _replaces_an_input(path: Path, like: MedicalImage | None) -> bool:
    """Whether ``path`` is a file ``like`` was read from, however spelled (symlinks, hard links)."""
    return any(same_file(path, source) for source in protected_paths(like))


def write_mask(
    mask: np.ndarray,
    path: str | PathLike[str],
    like: MedicalImage | None = None,
    *,
    label_names: Mapping[int, str] | None = None,
) -> Path:
    """Write a label map (0 = background) on the grid of ``like`` and return the written path.

    The mask must have ``like``'s spatial shape. ``label_names`` names segments in DICOM-SEG.
    """
    path = Path(path)
    mask = np.asarray(mask)
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer) or (mask.size and mask.min() < 0):
        raise OutputFileError(path, f"a mask must hold non-negative integer labels, got {mask.dtype}")
    if like is not None and tuple(mask.shape) != like.spatial_shape:
        raise OutputFileError(
            path, f"mask shape {tuple(mask.shape)} differs from the image's grid {like.spatial_shape}"
        )
    if _replaces_an_input(path, like) or path.is_dir():
        raise OutputFileError(path, "refusing to write over an input (or a folder); choose another output path")
    writer = _writer_for(path)
    with atomic_path(path) as temporary:
        writer(mask, temporary, like, label_names)
    return path


def write_image(rgb: np.ndarray, path: str | PathLike[str]) -> Path:
    """Write a uint8 grey or RGB picture (an overlay, a figure) as PNG or JPEG, atomically."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() not in {".png", ".jpg", ".jpeg"}:
        raise OutputFileError(path, "pictures are written as .png or .jpg")
    with atomic_path(path) as temporary:
        Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(temporary, format="PNG" if path.suffix.lower() == ".png" else "JPEG")
    return path


def write_map(values: np.ndarray, path: str | PathLike[str], like: MedicalImage | None = None) -> Path:
    """Write a float map in [0, 1] (probability, uncertainty) on the grid of ``like``: NIfTI keeps
    float32 values and the affine; PNG stores them scaled to 0-255; npz keeps float32 as ``map``."""
    import nibabel as nib

    path = Path(path)
    values = np.asarray(values, dtype=np.float32)
    if like is not None and tuple(values.shape) != like.spatial_shape:
        raise OutputFileError(path, f"map shape {tuple(values.shape)} differs from the image's grid {like.spatial_shape}")
    if _replaces_an_input(path, like):
        raise OutputFileError(path, "refusing to write over an input; choose another output path")
    name = path.name.lower()
    with atomic_path(path) as temporary:
        if name.endswith(NIFTI_SUFFIXES) and values.ndim == 3:
            affine = ras_affine(like) if like is not None else np.eye(4)
            nib.save(nib.Nifti1Image(values.transpose(2, 1, 0), affine), temporary)
        elif name.endswith(".png") and values.ndim == 2:
            from PIL import Image

            Image.fromarray(np.round(np.clip(values, 0, 1) * 255).astype(np.uint8)).save(temporary, format="PNG")
        elif name.endswith(".npz"):
            with open(temporary, "wb") as handle:
                np.savez_compressed(handle, map=values)
        else:
            raise OutputFileError(path, "maps are written as .nii/.nii.gz (volumes), .png (2D) or .npz")
    return path


def _writer_for(path: Path) -> Callable[..., None]:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return _write_nifti
    writers = {".png": _write_png, ".npz": _write_npz, ".dcm": _write_dicom_seg}
    if path.suffix.lower() not in writers:
        raise OutputFileError(path, "unknown output type; use .png, .nii/.nii.gz, .npz or .dcm (DICOM-SEG)")
    return writers[path.suffix.lower()]


def smallest_unsigned(mask: np.ndarray) -> np.ndarray:
    """uint8 when the labels fit (as viewers expect), else uint16."""
    return mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.uint16)


def _write_png(mask: np.ndarray, path: Path, like: MedicalImage | None, _names: object) -> None:
    from PIL import Image

    if mask.ndim != 2:
        raise OutputFileError(path, f"PNG holds a 2D mask; this one has shape {mask.shape} (use .nii.gz for volumes)")
    if mask.max(initial=0) >= 2**16:
        raise OutputFileError(path, "PNG holds at most 65535 labels")
    Image.fromarray(smallest_unsigned(mask)).save(path, format="PNG")


def _write_npz(mask: np.ndarray, path: Path, like: MedicalImage | None, _names: object) -> None:
    with open(path, "wb") as handle:
        np.savez_compressed(handle, segs=smallest_unsigned(mask))


def _write_nifti(mask: np.ndarray, path: Path, like: MedicalImage | None, _names: object) -> None:
    import nibabel as nib

    if mask.ndim == 2:  # a 2D image's mask: one slice, in-plane spacing kept
        spacing = like.spacing if like is not None else (1.0, 1.0)
        affine = np.diag([float(spacing[1]), float(spacing[0]), 1.0, 1.0])
        data = mask.T[:, :, None]
        codes = (1, 1)
    elif mask.ndim == 3:
        affine = ras_affine(like) if like is not None else np.eye(4)
        data = mask.transpose(2, 1, 0)
        header = like.native if like is not None and isinstance(like.native, nib.Nifti1Header) else None
        codes = (int(header["qform_code"]) or 1, int(header["sform_code"]) or 1) if header is not None else (1, 1)
    else:
        raise OutputFileError(path, f"cannot write a {mask.ndim}D mask as NIfTI")
    image = nib.Nifti1Image(smallest_unsigned(data), affine)
    image.set_qform(affine, code=codes[0])
    image.set_sform(affine, code=codes[1])
    image.header.set_xyzt_units("mm")
    nib.save(image, path)  # the temporary path keeps the .nii/.nii.gz suffix, so gzip follows it


def _write_dicom_seg(mask: np.ndarray, path: Path, like: MedicalImage | None, names: Mapping[int, str] | None) -> None:
    """DICOM-SEG (labelmap-style, one segment per label) referencing every source slice."""
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError as error:
        raise MissingDependencyError("highdicom", "dicom-seg", "writing DICOM-SEG") from error
    import medfm

    sources = like.native if like is not None and isinstance(like.native, list) else None
    if not sources or like.metadata.get("format") != "dicom":
        raise OutputFileError(path, "DICOM-SEG needs the DICOM series (or file) the mask was computed on as `like`")
    labels = [int(v) for v in np.unique(mask) if v != 0]
    if not labels:
        raise OutputFileError(path, "the mask is empty; DICOM-SEG cannot hold a segmentation with no segment")
    frames = mask if mask.ndim == 3 else mask[None]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medfm", version=medfm.__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=(names or {}).get(label, f"label {label}"),
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, label in enumerate(labels, start=1)
    ]
    segments = np.stack([frames == label for label in labels], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=segments,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(sources[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medfm",
        manufacturer_model_name="medfm",
        software_versions=medfm.__version__,
        device_serial_number="0",
    )
    seg.save_as(path)


def jsonable(value: object) -> object:
    """``value`` (e.g. a ``dataclasses.asdict``) with tuples as lists and paths as strings, so that
    ``json.dumps`` writes it and a reader gets back the same numbers and names."""
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return str(value) if isinstance(value, Path) else value


def write_model_folder(directory: str | PathLike[str], config: dict, tensors: dict) -> Path:
    """A medfm model folder: ``model.safetensors`` (CPU-contiguous ``tensors``) and ``config.json``
    with the weights' SHA-256 (checked when the folder loads), each written atomically; returns the folder."""
    from safetensors.torch import save_file

    from medfm.hub import sha256_of
    from medfm.safe_load import HASHES_FIELD, MODEL_WEIGHTS

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / MODEL_WEIGHTS) as temporary:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(temporary), metadata={"format": "pt"})
        config = {**config, HASHES_FIELD: {MODEL_WEIGHTS: sha256_of(temporary)}}
    with atomic_path(directory / "config.json") as temporary:
        temporary.write_text(json.dumps(config, indent=2) + "\n")
    return directory
