"""MetaImage (.mha/.mhd) and NRRD (.nrrd/.nhdr) headers, validated in Python before SimpleITK sees them.

SimpleITK aborts or segfaults on some headers (``NDims = 100``, ``NDims = -1``) and follows a data
file name anywhere on the machine (``ElementDataFile = /dev/zero``). So medfm parses the few fields
that decide what gets allocated and opened, checks them, and only then calls SimpleITK, with the
format's ImageIO named so that it cannot guess another one.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medfm.errors import InputFileError
from medfm.io.checks import check_data_length, check_declared_size, check_direction, check_regular_file, finite_numbers

#: Headers longer than this are not headers.
MAX_HEADER_BYTES = 1 << 20

META_ITEMSIZE = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}

NRRD_ITEMSIZE = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"), 8),
}
NRRD_ENCODINGS = {"raw", "gzip", "gz", "bzip2", "bz2", "ascii", "text", "txt", "hex"}


def sitk_image_io(path: Path, max_bytes: int) -> str:
    """Validate the header of ``path`` and return the SimpleITK ImageIO that must read it."""
    if path.suffix.lower() in {".mha", ".mhd"}:
        check_metaimage_header(path, max_bytes)
        return "MetaImageIO"
    check_nrrd_header(path, max_bytes)
    return "NrrdImageIO"


def check_metaimage_header(path: Path, max_bytes: int) -> None:
    """MetaImage: 3 dimensions, known element type, one channel, sane geometry, data inside the header's folder."""
    head = _head(path)
    fields: dict[str, str] = {}
    data_offset = None
    position = 0
    for line in head.splitlines(keepends=True):
        position += len(line)
        text = line.decode("latin-1").strip()
        if not text:
            continue
        key, separator, value = text.partition("=")
        if not separator:
            raise InputFileError(path, f"MetaImage header line without '=': {text[:60]!r}")
        key = _store(path, fields, key, value)
        if key == "elementdatafile":
            data_offset = position
            break
    if data_offset is None:
        raise InputFileError(path, "MetaImage header has no ElementDataFile line (not a MetaImage, or truncated)")
    sizes, itemsize = _volume_layout(path, fields, ("NDims", "DimSize", "ElementType"), META_ITEMSIZE)
    ndims = len(sizes)
    if _integer(path, "ElementNumberOfChannels", fields.get("elementnumberofchannels", "1")) != 1:
        raise InputFileError(path, "ElementNumberOfChannels is not 1; medfm reads single-channel volumes")
    for key, name in (("elementspacing", "ElementSpacing"), ("elementsize", "ElementSize")):
        if key in fields:
            finite_numbers(path, name, fields[key], ndims, positive=True)
    for key, name in (("offset", "Offset"), ("position", "Position"), ("origin", "Origin")):
        if key in fields:
            finite_numbers(path, name, fields[key], ndims)
    for key, name in (("transformmatrix", "TransformMatrix"), ("rotation", "Rotation"), ("orientation", "Orientation")):
        if key in fields:
            check_direction(path, np.reshape(finite_numbers(path, name, fields[key], ndims * ndims), (ndims, ndims)), name)
    compressed = fields.get("compresseddata", "False")
    if compressed not in {"True", "False"}:
        raise InputFileError(path, f"CompressedData is {compressed!r}; expected True or False")
    header_size = _integer(path, "HeaderSize", fields.get("headersize", "0"))
    if header_size < -1:
        raise InputFileError(path, f"HeaderSize is {header_size}")
    declared = check_declared_size(path, sizes, itemsize, max_bytes)
    data_file = fields["elementdatafile"]
    if data_file == "LOCAL":
        available = path.stat().st_size - data_offset
    else:
        available = _data_file_in_folder(path, data_file, "ElementDataFile").stat().st_size
    if compressed == "False":
        check_data_length(path, declared, available - max(header_size, 0))


def check_nrrd_header(path: Path, max_bytes: int) -> None:
    """NRRD: 3 dimensions, known type and encoding, data inside the header's folder."""
    head = _head(path)
    lines = head.split(b"\n")
    if not re.fullmatch(rb"NRRD000[1-5]\r?", lines[0]):
        raise InputFileError(path, "not an NRRD file (no 'NRRD000N' magic on the first line)")
    fields: dict[str, str] = {}
    data_offset = None
    position = len(lines[0]) + 1
    for line in lines[1:]:
        position += len(line) + 1
        text = line.decode("latin-1").rstrip("\r")
        if not text.strip():
            data_offset = position
            break
        if text.startswith("#") or ":=" in text:
            continue
        key, separator, value = text.partition(": ")
        if not separator:
            raise InputFileError(path, f"NRRD header line without ': ': {text[:60]!r}")
        _store(path, fields, key.replace(" ", ""), value)
    sizes, itemsize = _volume_layout(path, fields, ("dimension", "sizes", "type"), NRRD_ITEMSIZE)
    encoding = fields.get("encoding", "")
    if encoding not in NRRD_ENCODINGS:
        raise InputFileError(path, f"encoding {encoding!r} is not an NRRD encoding")
    if "spacings" in fields:
        finite_numbers(path, "spacings", fields["spacings"], len(sizes), positive=True)
    declared = check_declared_size(path, sizes, itemsize, max_bytes)
    data_file = fields.get("datafile")
    if data_file is not None:
        available = _data_file_in_folder(path, data_file, "data file").stat().st_size
    elif data_offset is None:
        raise InputFileError(path, "NRRD header has no end (no blank line) and no data file")
    else:
        available = path.stat().st_size - data_offset
    if encoding == "raw" and "byteskip" not in fields and "lineskip" not in fields:
        check_data_length(path, declared, available)


def _volume_layout(path: Path, fields: dict[str, str], names: tuple[str, str, str], itemsizes: dict[str, int]) -> tuple[list[int], int]:
    """Sizes and bytes per voxel of a 3D scalar volume, from the fields that hold its number of
    dimensions, its sizes and its element type (named as the format names them)."""
    dimensions_field, sizes_field, type_field = names
    dimensions = _integer(path, dimensions_field, fields.get(dimensions_field.lower()))
    if dimensions != 3:
        raise InputFileError(path, f"{dimensions_field} is {dimensions}; medfm reads 3D volumes")
    sizes = finite_numbers(path, sizes_field, fields.get(sizes_field.lower()), dimensions, positive=True)
    if not all(size.is_integer() for size in sizes):
        raise InputFileError(path, f"{sizes_field} are not whole numbers ({fields[sizes_field.lower()][:60]!r})")
    element = fields.get(type_field.lower(), "")
    if element not in itemsizes:
        raise InputFileError(path, f"{type_field} {element!r} is not a scalar type medfm reads")
    return [int(size) for size in sizes], itemsizes[element]


def _store(path: Path, fields: dict[str, str], key: str, value: str) -> str:
    """Keep a header field under its lower-case name; a repeated field is ambiguous, so an error."""
    key = key.strip().lower()
    if key in fields:
        raise InputFileError(path, f"the header repeats the field {key!r}")
    fields[key] = value.strip()
    return key


def _head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(MAX_HEADER_BYTES)


def _integer(path: Path, field: str, value: str | None) -> int:
    if value is None:
        raise InputFileError(path, f"{field} is missing")
    try:
        return int(value)
    except ValueError:
        raise InputFileError(path, f"{field} is not an integer ({value[:40]!r})") from None


def _data_file_in_folder(path: Path, name: str, field: str) -> Path:
    """The header's data file, which must be one regular file inside the header's own folder."""
    if not name.isprintable():
        raise InputFileError(path, f"{field} {name!r} is not a file name")
    if name.startswith("LIST") or "%" in name or " " in name.strip():
        raise InputFileError(path, f"{field} {name!r} names several files; medfm reads one data file per volume")
    folder = path.parent.resolve()
    data = (folder / name).resolve()
    if not data.is_relative_to(folder):
        raise InputFileError(path, f"{field} {name!r} lies outside the header's folder; medfm reads data only from there")
    if not data.exists():
        raise InputFileError(path, f"{field} {name!r} does not exist next to the header")
    check_regular_file(data)
    if data.is_dir():
        raise InputFileError(path, f"{field} {name!r} is a folder")
    return data
