"""Uploads: the file kind from its first bytes (never from the client's name), and the image size
from its header before any pixel is decoded. (The body-size limit is FastAPI's ``max_body_size``.)"""

from __future__ import annotations

import gzip
import math
import struct
import zipfile
from pathlib import Path

#: What the server reads, as the suffix its upload is stored under (read_image dispatches on it).
SUFFIXES = {"png": ".png", "jpeg": ".jpg", "nifti": ".nii", "nifti-gz": ".nii.gz", "dicom": ".dcm", "zip": ".zip"}
KINDS_TEXT = "PNG, JPEG, NIfTI (.nii, .nii.gz), a DICOM file or a zip of a DICOM series"


class UnsupportedUpload(Exception):
    """The upload is not a kind the server reads (HTTP 415)."""


class UploadTooLarge(Exception):
    """The upload, or the image it holds, is larger than the server accepts (HTTP 413)."""


def sniff(head: bytes) -> str:
    """The upload's kind from its first bytes (at least 352 of them when the file has them)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "nifti-gz"  # confirmed on the decompressed header by `check_size`
    if _is_nifti_header(head):
        return "nifti"
    raise UnsupportedUpload(f"not {KINDS_TEXT} (judged by its content, not its name)")


def _is_nifti_header(head: bytes) -> bool:
    """NIfTI-1 (sizeof_hdr 348, magic at 344) or NIfTI-2 (540, magic at 4), either byte order."""
    if len(head) >= 348 and head[344:348] in (b"n+1\0", b"ni1\0"):
        return struct.unpack("<i", head[:4])[0] == 348 or struct.unpack(">i", head[:4])[0] == 348
    if len(head) >= 8 and head[4:8] in (b"n+2\0", b"ni2\0"):
        return struct.unpack("<i", head[:4])[0] == 540 or struct.unpack(">i", head[:4])[0] == 540
    return False


def check_size(path: Path, kind: str, max_voxels: int) -> None:
    """Raise `UploadTooLarge` when the image holds more than ``max_voxels`` pixels (times frames,
    slices or channels), reading headers only; `UnsupportedUpload` for a gzip that is not NIfTI.
    Corrupt files pass here: `medfm.read_image` names their problem."""
    voxels = 0
    if kind in ("png", "jpeg"):
        from PIL import Image

        try:
            with Image.open(path) as opened:  # parses the header; pixels are decoded on load()
                voxels = opened.width * opened.height
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return
    elif kind in ("nifti", "nifti-gz"):
        if kind == "nifti-gz":
            try:
                with gzip.open(path) as handle:
                    if not _is_nifti_header(handle.read(352)):
                        raise UnsupportedUpload(f"a gzip file that is not NIfTI; this server reads {KINDS_TEXT}")
            except (OSError, EOFError) as error:
                raise UnsupportedUpload(f"a corrupt gzip file ({error})") from error
        import nibabel as nib

        try:
            voxels = math.prod(int(size) for size in nib.load(path).shape)  # header only: the data stays on disk
        except Exception:  # nibabel raises many types for broken headers; read_image reports them
            return
    elif kind == "dicom":
        import pydicom

        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            voxels = int(header.get("Rows", 0)) * int(header.get("Columns", 0)) * int(header.get("NumberOfFrames", 1) or 1)
        except Exception:  # pydicom raises many types for broken files; read_image reports them
            return
    elif kind == "zip":
        try:
            with zipfile.ZipFile(path) as archive:
                unpacked = sum(member.file_size for member in archive.infolist())
        except zipfile.BadZipFile:
            return
        if unpacked > 4 * max_voxels:  # a DICOM series holds about 2 bytes a voxel; 4 leaves room for headers
            raise UploadTooLarge(f"the zip unpacks to {unpacked / 2**20:.0f} MiB, more than this server's "
                                 f"limit of {4 * max_voxels / 2**20:.0f} MiB")
    if voxels > max_voxels:
        raise UploadTooLarge(f"the image holds {voxels:,} pixels, more than this server's limit of {max_voxels:,}")
