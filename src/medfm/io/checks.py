"""Checks every reader shares: file kind, declared size before allocation, numeric fields, dtype, geometry.

Readers call them on what a header *declares* before any pixel is decoded, so a 85-byte file that
declares a 10 GB volume fails in microseconds, and again on what was read, so no reader hands on
NaN spacing, a skewed direction or complex pixels. Each raises `InputFileError` naming the file
and the field.
"""

from __future__ import annotations

import math
import stat
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from medfm.errors import InputFileError

#: Default limit on the decoded pixel data of one read (1 GiB: a 512x512x2000 int16 CT fits).
DEFAULT_MAX_BYTES = 1 << 30

#: Largest ratio between the longest and the shortest in-plane side: models resize the longest
#: side to 1024 pixels, and beyond this the shortest would round to nothing.
MAX_ASPECT_RATIO = 512

#: Largest expansion of one zip member over its compressed size (deflate's own maximum is about 1032).
MAX_ZIP_RATIO = 200

#: Compression methods Python's zipfile unpacks.
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}

#: Tolerance on |D^T D - I| for direction cosines (ITK rejects non-orthonormal directions too).
ORTHONORMAL_TOLERANCE = 1e-3


def check_regular_file(path: Path) -> None:
    """Refuse FIFOs, devices and sockets before anything opens them (opening a FIFO blocks forever)."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise InputFileError(path, f"cannot access the file ({error.strerror or error})") from error
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InputFileError(path, "not a regular file (a pipe, device or socket); medfm reads only files and folders")


def check_declared_size(path: Path, shape: Sequence[int], itemsize: int, max_bytes: int, what: str = "pixel data") -> int:
    """The byte count ``shape`` x ``itemsize`` declares, after checking it is positive and within ``max_bytes``."""
    dims = [int(d) for d in shape]
    if any(d <= 0 for d in dims):
        raise InputFileError(path, f"{what} declares the size {tuple(dims)}; every dimension must be positive")
    declared = math.prod(dims) * int(itemsize)
    if declared > max_bytes:
        raise InputFileError(
            path,
            f"{what} declares {tuple(dims)} = {_gib(declared)}, over the read limit of {_gib(max_bytes)} "
            "(raise it with max_bytes= or --max-bytes if the file is really that large)",
        )
    return declared


def check_zip_members(path: Path, archive: zipfile.ZipFile, max_bytes: int) -> None:
    """Refuse encrypted members, unknown compression methods, more than ``max_bytes`` unpacked, and
    members that expand more than `MAX_ZIP_RATIO` times (zip bombs), before extracting anything."""
    total = 0
    for member in archive.infolist():
        if member.flag_bits & 0x1:
            raise InputFileError(path, f"zip member {member.filename!r} is encrypted")
        if member.compress_type not in ZIP_METHODS:
            raise InputFileError(path, f"zip member {member.filename!r} uses compression method {member.compress_type}, "
                                 "which Python cannot unpack (stored, deflate, bzip2 and lzma can)")
        total += member.file_size
        if member.file_size > (1 << 20) and member.file_size > MAX_ZIP_RATIO * max(member.compress_size, 1):
            raise InputFileError(path, f"zip member {member.filename!r} expands {member.file_size // max(member.compress_size, 1)}"
                                 f" times (over {MAX_ZIP_RATIO}): a zip bomb, or not medical images")
    if total > max_bytes:
        raise InputFileError(path, f"the zip unpacks to {_gib(total)}, over the read limit of {_gib(max_bytes)} "
                             "(raise it with max_bytes= or --max-bytes)")


def check_data_length(path: Path, declared: int, available: int, what: str = "pixel data") -> None:
    """Refuse data shorter than its header declares (truncated) before reading it."""
    if available < declared:
        raise InputFileError(path, f"{what} is truncated: the header declares {declared} bytes, the file holds {available}")


def finite_numbers(path: Path, field: str, value: object, count: int | None = None, *, positive: bool = False) -> tuple[float, ...]:
    """A header field parsed as ``count`` finite numbers (positive ones if asked), or an error naming it."""
    if value is None:
        raise InputFileError(path, f"{field} is missing or empty")
    items: Iterable[object]
    if isinstance(value, (str, bytes)):
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        items = text.replace("\\", " ").replace(",", " ").split()
    elif isinstance(value, np.ndarray):
        items = value.ravel().tolist() if value.ndim <= 1 else [value]
    elif isinstance(value, Iterable):
        items = list(value)
    else:
        items = [value]
    try:
        numbers = tuple(float(item) for item in items)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputFileError(path, f"{field} is not numeric ({_shown(value)})") from None
    if count is not None and len(numbers) != count:
        raise InputFileError(path, f"{field} has {len(numbers)} values ({_shown(value)}); expected {count}")
    if not all(math.isfinite(n) for n in numbers):
        raise InputFileError(path, f"{field} is not finite ({_shown(value)})")
    if positive and not all(n > 0 for n in numbers):
        raise InputFileError(path, f"{field} must be positive ({_shown(value)})")
    return numbers


def check_dtype(path: Path, dtype: np.dtype) -> None:
    """Only real numbers are images: refuse complex, boolean, string, object and structured (e.g. RGB24) data."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iuf" or dtype.fields is not None:
        hint = " (store it as uint8 0/1)" if dtype.kind == "b" else ""
        raise InputFileError(path, f"pixel type {dtype} is not a real number; medfm reads integer or float images{hint}")


def check_direction(path: Path, direction: np.ndarray, field: str = "direction") -> None:
    """Direction cosines must be finite and orthonormal (a rotation, possibly with a flip)."""
    direction = np.asarray(direction, dtype=np.float64)
    if not np.isfinite(direction).all():
        raise InputFileError(path, f"{field} is not finite ({direction.ravel().tolist()})")
    size = direction.shape[1]
    if np.abs(direction.T @ direction - np.eye(size)).max() > ORTHONORMAL_TOLERANCE:
        raise InputFileError(path, f"{field} is not orthonormal ({np.round(direction, 4).ravel().tolist()}): a sheared or degenerate grid")


def check_image(image) -> None:  # noqa: ANN001 - MedicalImage (imported lazily by its caller)
    """What every reader's result must satisfy: real dtype, finite positive spacing, finite origin and
    orthonormal direction, a usable in-plane aspect ratio."""
    path = image.path
    check_dtype(path, image.array.dtype)
    finite_numbers(path, "spacing", image.spacing, positive=True)
    finite_numbers(path, "origin", image.origin)
    check_direction(path, image.direction)
    height, width = image.spatial_shape[-2:]
    if min(height, width) > 0 and max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        raise InputFileError(
            path,
            f"the image is {height} x {width} pixels: sides more than {MAX_ASPECT_RATIO} times apart leave "
            "nothing of the shorter one at a model's input size; crop or tile it first",
        )


def _gib(count: int) -> str:
    return f"{count / (1 << 30):.3g} GiB" if count >= (1 << 26) else f"{count} bytes"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
