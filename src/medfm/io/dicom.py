"""DICOM in: single files (2D or multi-frame), series folders and zipped series.

A series is sorted by slice position along the slice normal (as ITK/GDCM do), every slice gets its
own rescale slope and intercept (so CT arrives in Hounsfield units), and the geometry comes from
Image Position/Orientation (Patient) and Pixel Spacing. Anything that would make that geometry a
guess (mixed series, mixed orientations, duplicate or unevenly spaced slices) is an error.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfm.errors import InputFileError, MedfmError
from medfm.io.checks import (
    DEFAULT_MAX_BYTES,
    check_data_length,
    check_declared_size,
    check_direction,
    check_zip_members,
    finite_numbers,
)
from medfm.io.image import MedicalImage, image_geometry_2d

#: Samples per pixel of each photometric interpretation medfm reads (pydicom turns YBR into RGB).
PHOTOMETRIC_SAMPLES = {
    "MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3, "YBR_FULL": 3, "YBR_FULL_422": 3,
    "YBR_ICT": 3, "YBR_RCT": 3, "YBR_PARTIAL_420": 3,
}

#: Deflated Explicit VR Little Endian, the transfer syntax pydicom inflates whole on reading.
DEFLATED_SYNTAX = b"1.2.840.10008.1.2.1.99"

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


def _dcmread(path: Path, max_bytes: int, stop_before_pixels: bool = False):  # noqa: ANN202 - pydicom Dataset
    import pydicom
    from pydicom.errors import InvalidDicomError

    data = path.read_bytes()
    _check_inflated_size(path, data, max_bytes)
    try:
        # from memory: a file object's read(n) allocates n bytes first, and a corrupt element length
        # would ask for gigabytes; BytesIO returns what is there
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as error:
        raise InputFileError(path, f"not a valid DICOM file ({error})") from error
    except MemoryError:
        raise
    except Exception as error:  # pydicom raises many types for truncated files and deflate streams
        raise InputFileError(path, f"corrupt or truncated DICOM file ({type(error).__name__}: {error})") from error


def _check_inflated_size(path: Path, data: bytes, max_bytes: int) -> None:
    """pydicom inflates a deflated dataset whole: count what it would inflate to first, a megabyte at a
    time, and refuse more than ``max_bytes`` (a zip bomb in DICOM clothing)."""
    if data[128:136] != b"DICM\x02\x00\x00\x00" or DEFLATED_SYNTAX not in data[:4096]:
        return
    stream = data[144 + int.from_bytes(data[140:144], "little"):]  # after the file meta group
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = 0
    try:
        while stream and inflated <= max_bytes:
            inflated += len(inflater.decompress(stream, 1 << 20))
            stream = inflater.unconsumed_tail
    except zlib.error:
        return  # pydicom reports the corrupt stream, with its own words
    if inflated > max_bytes:
        raise InputFileError(path, f"the deflated dataset inflates past the read limit of {max_bytes} bytes "
                             "(raise it with max_bytes= or --max-bytes)")


def _field(dataset, keyword: str, path: Path, default=None):  # noqa: ANN001, ANN202 - pydicom values
    """An attribute's value (``default`` when absent); a value pydicom cannot convert is an error naming it."""
    try:
        value = dataset.get(keyword, default)
    except MemoryError:
        raise
    except Exception as error:
        raise InputFileError(path, f"{keyword} is unreadable ({type(error).__name__}: {error})") from error
    return default if value is None and default is not None else value


def _numbers(dataset, keyword: str, path: Path, count: int, *, positive: bool = False) -> tuple[float, ...]:  # noqa: ANN001
    return finite_numbers(path, keyword, _field(dataset, keyword, path), count, positive=positive)


def _integer(dataset, keyword: str, path: Path, default: int | None = None, allowed: set[int] | None = None) -> int:  # noqa: ANN001
    value = _field(dataset, keyword, path, default)
    (number,) = finite_numbers(path, keyword, value, 1)
    if number != int(number) or (allowed is not None and int(number) not in allowed):
        expected = f"one of {sorted(allowed)}" if allowed else "an integer"
        raise InputFileError(path, f"{keyword} is {value!r}; expected {expected}")
    return int(number)


def _orientation(dataset, path: Path) -> np.ndarray:  # noqa: ANN001
    """Image Orientation (Patient): two orthonormal direction cosines (row, column) as a (2, 3) array."""
    cosines = np.reshape(_numbers(dataset, "ImageOrientationPatient", path, 6), (2, 3))
    check_direction(path, cosines.T, "ImageOrientationPatient")
    return cosines


def _pixel_spacing(dataset, path: Path, required: bool) -> tuple[float, float]:  # noqa: ANN001
    """Row and column spacing (mm) from the shared functional groups, Pixel Spacing or Imager Pixel Spacing."""
    shared = _first_item(dataset, "SharedFunctionalGroupsSequence", path)
    measures = _first_item(shared, "PixelMeasuresSequence", path) if shared is not None else None
    for source in (measures, dataset):
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            if source is not None and keyword in source:
                return _numbers(source, keyword, path, 2, positive=True)  # type: ignore[return-value]
    if required:
        raise InputFileError(path, "PixelSpacing is missing; a volume needs it")
    return (1.0, 1.0)


def _first_item(dataset, keyword: str, path: Path):  # noqa: ANN001, ANN202 - pydicom Dataset or None
    sequence = _field(dataset, keyword, path)
    return sequence[0] if sequence else None


@dataclass(frozen=True)
class PixelLayout:
    """What a DICOM header declares about its pixel data."""

    frames: int
    rows: int
    columns: int
    samples: int
    bits: int
    photometric: str

    def shape(self, frame: int | None = None) -> tuple[int, ...]:
        """The shape pydicom decodes to: (frames,) rows, columns (, samples)."""
        shape = (self.rows, self.columns) + ((self.samples,) if self.samples > 1 else ())
        return ((self.frames,) + shape) if self.frames > 1 and frame is None else shape


def _pixel_layout(dataset, path: Path, max_bytes: int) -> PixelLayout:  # noqa: ANN001
    from pydicom.uid import UID

    """The declared pixel layout, checked for consistency, against ``max_bytes`` and, for uncompressed
    data, against the length of the pixel data (none may be missing), before anything is decoded."""
    if "PixelData" not in dataset:
        raise InputFileError(path, "the DICOM file has no pixel data (is it a report or a DICOMDIR?)")
    photometric = str(_field(dataset, "PhotometricInterpretation", path, "")).strip()
    if photometric not in PHOTOMETRIC_SAMPLES:
        raise InputFileError(path, f"PhotometricInterpretation {photometric!r} is not one medfm reads "
                             f"({', '.join(PHOTOMETRIC_SAMPLES)})")
    layout = PixelLayout(
        frames=_integer(dataset, "NumberOfFrames", path, 1),
        rows=_integer(dataset, "Rows", path),
        columns=_integer(dataset, "Columns", path),
        samples=_integer(dataset, "SamplesPerPixel", path, 1, {PHOTOMETRIC_SAMPLES[photometric]}),
        bits=_integer(dataset, "BitsAllocated", path, allowed={1, 8, 16, 32, 64}),
        photometric=photometric,
    )
    pixels = (layout.frames, layout.rows, layout.columns, layout.samples)
    check_declared_size(path, pixels, max(layout.bits // 8, 1), max_bytes, "Rows x Columns x frames x samples")
    syntax = _transfer_syntax(dataset, path)
    if syntax is not None and not (isinstance(syntax, UID) and syntax.is_transfer_syntax):
        raise InputFileError(path, f"TransferSyntaxUID {str(syntax)[:64]!r} is not a transfer syntax")
    if syntax is not None and not syntax.is_compressed:
        samples = 2 if photometric == "YBR_FULL_422" else layout.samples
        expected = -(-layout.frames * layout.rows * layout.columns * samples * layout.bits // 8)
        # longer data is trailing padding pydicom ignores; the decoded shape is checked in `_pixels`
        check_data_length(path, expected, len(dataset.PixelData), "PixelData")
    return layout


def _transfer_syntax(dataset, path: Path):  # noqa: ANN001, ANN202 - pydicom Dataset and UID
    meta = getattr(dataset, "file_meta", None)
    return _field(meta, "TransferSyntaxUID", path) if meta is not None else None


def _pixels(dataset, path: Path, max_bytes: int, frame: int | None = None) -> np.ndarray:  # noqa: ANN001 - pydicom Dataset
    """Decoded pixels (one frame if asked): PALETTE COLOR through its lookup table to RGB, grey values
    through the modality LUT (rescale slope and intercept), MONOCHROME1 inverted."""
    from pydicom.pixels import apply_color_lut, pixel_array

    layout = _pixel_layout(dataset, path, max_bytes)
    if frame is not None and not 0 <= frame < layout.frames:
        raise InputFileError(path, f"frame {frame} is outside the file's {layout.frames} frame(s) (0 to {layout.frames - 1})")
    try:
        stored = pixel_array(dataset, index=frame) if frame is not None else dataset.pixel_array
    except MemoryError:
        raise
    except Exception as error:  # pydicom raises a variety for compressed or truncated data
        syntax = _transfer_syntax(dataset, path)
        hint = "; compressed DICOM may need pylibjpeg or gdcm installed" if syntax and syntax.is_compressed else ""
        raise InputFileError(
            path, f"cannot decode the pixel data (transfer syntax {syntax or '?'}: {type(error).__name__}: {error}){hint}"
        ) from error
    if stored.shape != layout.shape(frame):
        raise InputFileError(path, f"the pixel data decodes to shape {stored.shape}, but the header declares {layout.shape(frame)}")
    if layout.photometric == "PALETTE COLOR":
        return _through_table(apply_color_lut, stored, dataset, path, "the palette color lookup table")
    if layout.samples > 1:
        return stored
    values = _modality_values(stored, dataset, path)
    if layout.photometric == "MONOCHROME1":
        values = values.max() + values.min() - values
    return values


def _through_table(apply, stored: np.ndarray, dataset, path: Path, table: str) -> np.ndarray:  # noqa: ANN001
    """``apply(stored, dataset)`` (a pydicom lookup-table function), its failures named after ``table``."""
    try:
        return apply(stored, dataset)
    except MemoryError:
        raise
    except Exception as error:
        raise InputFileError(path, f"{table} is unusable ({type(error).__name__}: {error})") from error


def _modality_values(stored: np.ndarray, dataset, path: Path) -> np.ndarray:  # noqa: ANN001 - pydicom Dataset
    """Stored values through the Modality LUT Sequence, or Rescale Slope and Intercept when present."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in dataset:
        return _through_table(apply_modality_lut, stored, dataset, path, "ModalityLUTSequence")
    slope = _numbers(dataset, "RescaleSlope", path, 1)[0] if "RescaleSlope" in dataset else 1.0
    intercept = _numbers(dataset, "RescaleIntercept", path, 1)[0] if "RescaleIntercept" in dataset else 0.0
    if slope == 0:
        raise InputFileError(path, "RescaleSlope is 0: every pixel would have the same value")
    if slope == 1 and intercept == 0:
        return stored
    return stored * slope + intercept


def _compact(values: np.ndarray) -> np.ndarray:
    """Integers stay integers (int16 when they fit, as CT in HU does); other values become float32."""
    if np.issubdtype(values.dtype, np.integer) or np.array_equal(values, np.round(values)):
        low, high = values.min(), values.max()
        for dtype in (np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= low and high <= info.max:
                return values.astype(dtype)
    return values.astype(np.float32)


def _metadata(dataset, kind: str, path: Path) -> dict:  # noqa: ANN001 - pydicom Dataset
    fields = {
        "patient_id": "PatientID",
        "study_uid": "StudyInstanceUID",
        "series_uid": "SeriesInstanceUID",
        "series_description": "SeriesDescription",
        "body_part": "BodyPartExamined",
        "photometric": "PhotometricInterpretation",
    }
    metadata = {"format": "dicom", "kind": kind}
    values = {key: _field(dataset, tag, path) for key, tag in fields.items()}
    metadata.update({key: str(value) for key, value in values.items() if value is not None})
    return metadata


def read_dicom_file(path: Path, frame: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> MedicalImage:
    """One DICOM file: a 2D image, or a multi-frame volume when it holds several frames (``frame``
    picks one of them as a 2D image)."""
    dataset = _dcmread(path, max_bytes)
    values = _pixels(dataset, path, max_bytes, frame)
    if values.ndim == 4 or (values.ndim == 3 and frame is None and _integer(dataset, "NumberOfFrames", path, 1) > 1):
        return _multiframe_volume(dataset, _compact(values), path)
    array = values if values.ndim == 3 else _compact(values)
    metadata = _metadata(dataset, "image", path) | ({"frame": frame} if frame is not None else {})
    return MedicalImage(
        array=array,
        modality=_field(dataset, "Modality", path),
        metadata=metadata,
        native=[dataset],
        **image_geometry_2d(_pixel_spacing(dataset, path, required=False)),
    )


def _multiframe_volume(dataset, values: np.ndarray, path: Path) -> MedicalImage:  # noqa: ANN001
    """Multi-frame geometry from the per-frame functional groups (enhanced CT/MR), else from the
    top-level tags (e.g. RT dose with Grid Frame Offset Vector)."""
    if values.ndim != 3:
        raise InputFileError(path, f"multi-frame colour DICOM of shape {values.shape}; pick one frame with --frame K")
    shared = _first_item(dataset, "SharedFunctionalGroupsSequence", path)
    plane = _first_item(shared, "PlaneOrientationSequence", path) if shared is not None else None
    orientation_source = plane if plane is not None else dataset
    unknown = "multi-frame DICOM without per-frame position and orientation; geometry unknown (pick one frame with --frame K)"
    if _field(orientation_source, "ImageOrientationPatient", path) is None:
        raise InputFileError(path, unknown)
    orientation = _orientation(orientation_source, path)
    positions = []
    for frame in _field(dataset, "PerFrameFunctionalGroupsSequence", path, []):
        position = _first_item(frame, "PlanePositionSequence", path)
        if position is not None:
            positions.append(_numbers(position, "ImagePositionPatient", path, 3))
    if not positions and "GridFrameOffsetVector" in dataset and "ImagePositionPatient" in dataset:
        origin = np.asarray(_numbers(dataset, "ImagePositionPatient", path, 3))
        offsets = _numbers(dataset, "GridFrameOffsetVector", path, values.shape[0])
        normal = np.cross(*orientation)
        positions = [origin + offset * normal for offset in offsets]
    if len(positions) != values.shape[0]:
        raise InputFileError(path, unknown)
    pixel_spacing = _pixel_spacing(dataset, path, required=True)
    return _volume_from_slices(values, positions, orientation, pixel_spacing, dataset, path, native=[dataset])


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
    gap = float(np.median(gaps)) if len(gaps) else 1.0
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
        modality=_field(reference, "Modality", path),
        metadata=_metadata(reference, "volume", path),
        native=[native[i] for i in order] if len(native) == len(order) else native,
    )


def _series_files(folder: Path, max_bytes: int) -> dict[str, list[tuple[Path, object]]]:
    """DICOM headers of every file under ``folder`` grouped by SeriesInstanceUID; non-DICOM files skipped."""
    series: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = _dcmread(file, max_bytes, stop_before_pixels=True)
            is_dicomdir = _field(header, "SOPClassUID", file) == "1.2.840.10008.1.3.10"
            uid = str(_field(header, "SeriesInstanceUID", file, "unknown"))
        except InputFileError:  # not DICOM, or a header too broken to group: skipped like any other file
            continue
        if not is_dicomdir:
            series[uid].append((file, header))
    return series


def read_dicom_series(
    folder: Path, series_uid: str | None = None, display_path: Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> MedicalImage:
    """A folder holding one DICOM series (or ``series_uid`` chosen among several) as a volume."""
    shown = display_path or folder
    series = _series_files(folder, max_bytes)
    if not series:
        raise InputFileError(shown, "no DICOM files found in the folder")
    if series_uid is None and len(series) > 1:
        listing = "; ".join(
            f"{uid} ({len(files)} files, '{_field(files[0][1], 'SeriesDescription', files[0][0], '')}')" for uid, files in series.items()
        )
        raise InputFileError(shown, f"the folder holds {len(series)} DICOM series; pick one with series_uid: {listing}")
    uid = series_uid if series_uid is not None else next(iter(series))
    if uid not in series:
        raise InputFileError(shown, f"no series {uid} in the folder (it has {sorted(series)})")
    files = [file for file, _ in series[uid]]
    if len(files) == 1:
        image = read_dicom_file(files[0], max_bytes=max_bytes)
        image.metadata["source_files"] = [str(files[0])]
        return image
    datasets = [_dcmread(file, max_bytes) for file in files]
    layouts = {(layout.frames, layout.rows, layout.columns, layout.samples, layout.bits)
               for layout in (_pixel_layout(d, f, max_bytes) for d, f in zip(datasets, files))}
    if len(layouts) > 1:
        raise InputFileError(shown, f"slices of the series have different sizes (frames, rows, columns, samples, bits): {sorted(layouts)}")
    frames, rows, columns, samples, bits = layouts.pop()
    if frames > 1 or samples > 1:
        raise InputFileError(shown, "the series holds multi-frame or colour files; read them one by one")
    check_declared_size(shown, (len(files), rows, columns), max(bits // 8, 1), max_bytes, "the series")
    orientations = [_orientation(d, f) for d, f in zip(datasets, files)]
    if any(not np.allclose(o, orientations[0], atol=1e-4) for o in orientations):
        raise InputFileError(shown, "slices of the series have different orientations")
    positions = [_numbers(d, "ImagePositionPatient", f, 3) for d, f in zip(datasets, files)]
    order = _slice_order(positions, orientations[0])
    datasets = [datasets[i] for i in order]
    files = [files[i] for i in order]
    image = _volume_from_slices(
        _compact(np.stack([_pixels(d, f, max_bytes) for d, f in zip(datasets, files)])),
        [positions[i] for i in order],
        orientations[0],
        _pixel_spacing(datasets[0], files[0], required=True),
        datasets[0],
        shown,
        native=datasets,
    )
    image.metadata["source_files"] = [str(file) for file in files]
    return image


def read_dicom_zip(path: Path, series_uid: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> MedicalImage:
    """A zip archive of one DICOM series, checked (size, ratio, encryption) and unpacked to a temporary folder."""
    try:
        with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(prefix="medfm-dicom-") as folder:
            check_zip_members(path, archive, max_bytes)
            archive.extractall(folder)
            image = read_dicom_series(Path(folder), series_uid=series_uid, display_path=path, max_bytes=max_bytes)
    except (MedfmError, MemoryError):
        raise
    except Exception as error:  # zipfile raises BadZipFile, zlib.error, EOFError, NotImplementedError, ...
        raise InputFileError(path, f"corrupt zip archive ({type(error).__name__}: {error})") from error
    image.metadata.pop("source_files", None)
    return image
