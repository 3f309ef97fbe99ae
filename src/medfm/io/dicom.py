"""DICOM in: single files (2D or multi-frame), series folders and zipped series.

A series is sorted by slice position along the slice normal (as ITK/GDCM do), every slice gets its
own rescale slope and intercept (so CT arrives in Hounsfield units), and the geometry comes from
Image Position/Orientation (Patient) and Pixel Spacing. Anything that would make that geometry a
guess (mixed series, mixed orientations, duplicate or unevenly spaced slices) is an error.
"""

from __future__ import annotations

import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from medfm.errors import InputFileError
from medfm.io.image import MedicalImage, image_geometry_2d

#: Relative tolerance on slice gaps before a series counts as unevenly spaced.
SLICE_GAP_TOLERANCE = 0.01


def has_dicom_preamble(path: Path) -> bool:
    """True when the file carries the 'DICM' magic at byte 128 (extension-less DICOM files)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _dcmread(path: Path, stop_before_pixels: bool = False):  # noqa: ANN202 - pydicom Dataset
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as error:
        raise InputFileError(path, f"not a valid DICOM file ({error})") from error
    except (OSError, EOFError, ValueError, KeyError, TypeError) as error:
        raise InputFileError(path, f"corrupt or truncated DICOM file ({type(error).__name__}: {error})") from error


def _pixels(dataset, path: Path) -> np.ndarray:  # noqa: ANN001 - pydicom Dataset
    """Stored pixels with the modality LUT (rescale slope/intercept) applied; MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut

    if "PixelData" not in dataset:
        raise InputFileError(path, "the DICOM file has no pixel data (is it a report or a DICOMDIR?)")
    try:
        stored = dataset.pixel_array
    except Exception as error:  # pydicom raises a variety for compressed or truncated data
        raise InputFileError(
            path,
            f"cannot decode the pixel data (transfer syntax {dataset.file_meta.get('TransferSyntaxUID', '?')}: "
            f"{error}); compressed DICOM may need pylibjpeg or gdcm installed",
        ) from error
    values = apply_modality_lut(stored, dataset)
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        values = values.max() + values.min() - values
    return values


def _compact(values: np.ndarray) -> np.ndarray:
    """Integers stay integers (int16 when they fit, as CT in HU does); other values become float32."""
    if np.issubdtype(values.dtype, np.integer) or np.array_equal(values, np.round(values)):
        low, high = values.min(), values.max()
        for dtype in (np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= low and high <= info.max:
                return values.astype(dtype)
    return values.astype(np.float32)


def _metadata(dataset, kind: str) -> dict:  # noqa: ANN001 - pydicom Dataset
    fields = {
        "patient_id": "PatientID",
        "study_uid": "StudyInstanceUID",
        "series_uid": "SeriesInstanceUID",
        "series_description": "SeriesDescription",
        "body_part": "BodyPartExamined",
        "photometric": "PhotometricInterpretation",
    }
    metadata = {"format": "dicom", "kind": kind}
    metadata.update({key: str(dataset.get(tag)) for key, tag in fields.items() if dataset.get(tag) is not None})
    return metadata


def read_dicom_file(path: Path) -> MedicalImage:
    """One DICOM file: a 2D image, or a multi-frame volume when it holds several frames."""
    dataset = _dcmread(path)
    values = _pixels(dataset, path)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    modality = dataset.get("Modality")
    if frames > 1:
        return _multiframe_volume(dataset, _compact(values), path)
    spacing = dataset.get("PixelSpacing") or dataset.get("ImagerPixelSpacing") or (1.0, 1.0)
    array = values if values.ndim == 3 else _compact(values)
    return MedicalImage(
        array=array,
        modality=modality,
        metadata=_metadata(dataset, "image"),
        native=[dataset],
        **image_geometry_2d((float(spacing[0]), float(spacing[1]))),
    )


def _multiframe_volume(dataset, values: np.ndarray, path: Path) -> MedicalImage:  # noqa: ANN001
    """Multi-frame geometry from the per-frame functional groups (enhanced CT/MR), else from the
    top-level tags (e.g. RT dose with Grid Frame Offset Vector)."""
    orientation = _first_attribute(dataset, "PlaneOrientationSequence", "ImageOrientationPatient")
    measures = dataset.get("SharedFunctionalGroupsSequence", [None])[0]
    pixel_spacing = (measures.PixelMeasuresSequence[0].PixelSpacing if measures and "PixelMeasuresSequence" in measures
                     else dataset.get("PixelSpacing"))
    positions = []
    for frame in dataset.get("PerFrameFunctionalGroupsSequence", []):
        if "PlanePositionSequence" in frame:
            positions.append([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
    if not positions and "GridFrameOffsetVector" in dataset and "ImagePositionPatient" in dataset:
        origin = np.asarray(dataset.ImagePositionPatient, dtype=float)
        normal = np.cross(*np.asarray(orientation, dtype=float).reshape(2, 3))
        positions = [origin + float(offset) * normal for offset in dataset.GridFrameOffsetVector]
    if orientation is None or pixel_spacing is None or len(positions) != values.shape[0]:
        raise InputFileError(path, "multi-frame DICOM without per-frame position and orientation; geometry unknown")
    return _volume_from_slices(values, positions, orientation, pixel_spacing, dataset, path, native=[dataset])


def _first_attribute(dataset, sequence: str, keyword: str):  # noqa: ANN001, ANN202
    shared = dataset.get("SharedFunctionalGroupsSequence", [None])[0]
    if shared is not None and sequence in shared:
        return shared[sequence][0].get(keyword)
    return dataset.get(keyword)


def _slice_order(positions, orientation) -> np.ndarray:  # noqa: ANN001
    """Indices that sort slices by their position along the slice normal (ITK/GDCM order)."""
    normal = np.cross(*np.asarray(orientation, dtype=float).reshape(2, 3))
    return np.argsort(np.asarray(positions, dtype=float) @ normal, kind="stable")


def _volume_from_slices(values, positions, orientation, pixel_spacing, reference, path, native):  # noqa: ANN001, ANN202
    """Stack sorted slices and derive LPS geometry in (Z, Y, X) axis order; check the slice gaps."""
    row_cosine, column_cosine = np.asarray(orientation, dtype=float).reshape(2, 3)
    normal = np.cross(row_cosine, column_cosine)
    positions = np.asarray(positions, dtype=float)
    order = _slice_order(positions, orientation)
    distances = positions[order] @ normal
    gaps = np.diff(distances)
    if len(gaps) and gaps.min() <= 1e-4:
        raise InputFileError(path, "two slices share the same position (duplicate files or several series mixed)")
    gap = float(np.median(gaps)) if len(gaps) else float(reference.get("SliceThickness", 1.0) or 1.0)
    if len(gaps) and np.abs(gaps - gap).max() > SLICE_GAP_TOLERANCE * gap + 1e-3:
        raise InputFileError(
            path,
            f"slices are unevenly spaced (gaps from {gaps.min():.3f} to {gaps.max():.3f} mm): a slice may be "
            "missing, or the series mixes acquisitions",
        )
    direction = np.stack([normal, column_cosine, row_cosine], axis=1)
    return MedicalImage(
        array=np.ascontiguousarray(values[order]),
        spacing=(gap, float(pixel_spacing[0]), float(pixel_spacing[1])),
        origin=tuple(float(v) for v in positions[order[0]]),
        direction=direction,
        modality=reference.get("Modality"),
        metadata=_metadata(reference, "volume"),
        native=[native[i] for i in order] if len(native) == len(order) else native,
    )


def _series_files(folder: Path) -> dict[str, list[tuple[Path, object]]]:
    """DICOM headers of every file under ``folder`` grouped by SeriesInstanceUID; non-DICOM files skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
            continue
        if "SOPClassUID" in header and header.SOPClassUID == "1.2.840.10008.1.3.10":  # DICOMDIR
            continue
        series[str(header.get("SeriesInstanceUID", "unknown"))].append((file, header))
    return series


def read_dicom_series(folder: Path, series_uid: str | None = None, display_path: Path | None = None) -> MedicalImage:
    """A folder holding one DICOM series (or ``series_uid`` chosen among several) as a volume."""
    shown = display_path or folder
    series = _series_files(folder)
    if not series:
        raise InputFileError(shown, "no DICOM files found in the folder")
    if series_uid is None and len(series) > 1:
        listing = "; ".join(
            f"{uid} ({len(files)} files, '{files[0][1].get('SeriesDescription', '')}')" for uid, files in series.items()
        )
        raise InputFileError(shown, f"the folder holds {len(series)} DICOM series; pick one with series_uid: {listing}")
    uid = series_uid if series_uid is not None else next(iter(series))
    if uid not in series:
        raise InputFileError(shown, f"no series {uid} in the folder (it has {sorted(series)})")
    files = [file for file, _ in series[uid]]
    if len(files) == 1:
        image = read_dicom_file(files[0])
        image.metadata["source_files"] = [str(files[0])]
        return image
    datasets = [_dcmread(file) for file in files]
    if any("ImagePositionPatient" not in d or "ImageOrientationPatient" not in d for d in datasets):
        raise InputFileError(shown, "slices lack Image Position/Orientation (Patient); cannot stack them into a volume")
    orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    if any(not np.allclose(np.asarray(d.ImageOrientationPatient, dtype=float), orientation, atol=1e-4) for d in datasets):
        raise InputFileError(shown, "slices of the series have different orientations")
    shapes = {(int(d.Rows), int(d.Columns)) for d in datasets}
    if len(shapes) > 1:
        raise InputFileError(shown, f"slices of the series have different sizes {sorted(shapes)}")
    order = _slice_order([d.ImagePositionPatient for d in datasets], orientation)
    datasets = [datasets[i] for i in order]
    files = [files[i] for i in order]
    image = _volume_from_slices(
        _compact(np.stack([_pixels(d, f) for d, f in zip(datasets, files)])),
        [d.ImagePositionPatient for d in datasets],
        orientation,
        datasets[0].PixelSpacing,
        datasets[0],
        shown,
        native=datasets,
    )
    image.metadata["source_files"] = [str(file) for file in files]
    return image


def read_dicom_zip(path: Path, series_uid: str | None = None) -> MedicalImage:
    """A zip archive of one DICOM series, unpacked to a temporary folder and read as a series."""
    try:
        with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(prefix="medfm-dicom-") as folder:
            archive.extractall(folder)
            image = read_dicom_series(Path(folder), series_uid=series_uid, display_path=path)
    except zipfile.BadZipFile as error:
        raise InputFileError(path, f"corrupt zip archive ({error})") from error
    image.metadata.pop("source_files", None)
    return image
