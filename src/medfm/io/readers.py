"""Readers: every supported file kind becomes a `MedicalImage` with its geometry, or a clear error.

``read_image`` dispatches on the path: a folder (DICOM series), ``.zip`` (a zipped DICOM series),
``.nii``/``.nii.gz``, ``.dcm`` or any file with the DICOM preamble, ``.npz`` (CVPR 2024 "MedSAM on
Laptop"), PNG/JPEG/TIFF/BMP, and NRRD/MHA when SimpleITK is installed.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Callable
from os import PathLike
from pathlib import Path

import numpy as np

from medfm.errors import InputFileError, MissingDependencyError, OptionError
from medfm.io.checks import (
    DEFAULT_MAX_BYTES,
    check_data_length,
    check_declared_size,
    check_dtype,
    check_image,
    check_regular_file,
    check_zip_members,
    finite_numbers,
)
from medfm.io.image import RAS_TO_LPS, MedicalImage, image_geometry_2d

PHOTO_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = {".nrrd", ".nhdr", ".mha", ".mhd"}

#: Permutation between NIfTI voxel indices (i, j, k) and medfm's array axes (Z, Y, X) = (k, j, i).
#: It is its own inverse.
IJK_TO_ZYX = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def read_image(
    path: str | PathLike[str],
    *,
    modality: str | None = None,
    series_uid: str | None = None,
    frame: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> MedicalImage:
    """Read a medical image file (or DICOM folder / zip) into a `MedicalImage`.

    ``modality`` overrides the one stored in the file (PNG and NIfTI store none), e.g. ``"CT"``
    so that CT windows apply. ``series_uid`` picks one series from a folder holding several;
    ``frame`` picks one frame (0-based) of a multi-frame DICOM file as a 2D image. ``max_bytes``
    bounds the pixel data a header may declare (checked before anything is allocated; 1 GiB unless
    raised). Raises `InputFileError` naming the file and the field for anything missing, corrupt,
    oversized or unsupported.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "no such file or folder")
    check_regular_file(path)
    reader = _reader_for(path)
    options: dict[str, object] = {"max_bytes": max_bytes}
    if reader is _read_dicom_folder or reader is _read_dicom_zip:
        options["series_uid"] = series_uid
    if frame is not None:
        from medfm.io import dicom

        if reader is not dicom.read_dicom_file:
            raise OptionError(f"{path}: frame={frame} applies to multi-frame DICOM files only")
        options["frame"] = frame
    image = reader(path, **options)
    image.path = path
    if modality is not None:
        image.modality = modality
    check_image(image)
    check_pixel_values(image)
    return image


def _reader_for(path: Path) -> Callable[..., MedicalImage]:
    from medfm.io import dicom

    if path.is_dir():
        return _read_dicom_folder
    name = path.name.lower()
    suffix = path.suffix.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return read_nifti
    if suffix in PHOTO_SUFFIXES:
        return read_photo
    if suffix == ".npz":
        return read_challenge_npz
    if suffix == ".zip":
        return _read_dicom_zip
    if suffix in ITK_SUFFIXES:
        return read_with_simpleitk
    if suffix in {".dcm", ".dicom", ".ima"} or dicom.has_dicom_preamble(path):
        return dicom.read_dicom_file
    raise InputFileError(
        path,
        f"unknown file type '{suffix or name}': medfm reads PNG/JPEG/TIFF/BMP, NIfTI (.nii, .nii.gz), "
        "DICOM (file, series folder or .zip), the challenge .npz, and NRRD/MHA with SimpleITK",
    )


def _read_dicom_folder(path: Path, series_uid: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> MedicalImage:
    from medfm.io import dicom

    return dicom.read_dicom_series(path, series_uid=series_uid, max_bytes=max_bytes)


def _read_dicom_zip(path: Path, series_uid: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> MedicalImage:
    from medfm.io import dicom

    return dicom.read_dicom_zip(path, series_uid=series_uid, max_bytes=max_bytes)


def check_pixel_values(image: MedicalImage) -> None:
    """Reject empty images and non-finite intensities: no model gives a meaningful mask on them."""
    if image.array.size == 0 or 0 in image.array.shape:
        raise InputFileError(image.path, f"the image is empty (shape {tuple(image.array.shape)})")
    if np.issubdtype(image.array.dtype, np.floating):
        finite = np.isfinite(image.array)
        if not finite.all():
            bad = 1.0 - float(finite.mean())
            raise InputFileError(
                image.path,
                f"{bad:.1%} of the voxels are NaN or infinite; fill or mask them before segmenting",
            )


def read_photo(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> MedicalImage:
    """PNG / JPEG / TIFF / BMP: 8- or 16-bit, grey ``(H, W)`` or colour ``(H, W, 3)``."""
    from PIL import Image, ImageMode, UnidentifiedImageError

    try:
        # from memory: a file object's read(n) allocates n bytes first, and a corrupt chunk length
        # would ask for gigabytes; BytesIO returns what is there
        with Image.open(io.BytesIO(path.read_bytes())) as opened:
            frames = getattr(opened, "n_frames", 1)
            if frames > 1:
                raise InputFileError(path, f"multi-page image with {frames} pages; save one page per file")
            bands = max(len(opened.getbands()), 3)  # grey-with-alpha and palettes become RGB
            itemsize = np.dtype(ImageMode.getmode(opened.mode).typestr).itemsize
            check_declared_size(path, (opened.height, opened.width, bands), itemsize, max_bytes, "the image")
            opened.load()
            array = _tiff_sample_bits(opened, _pil_to_array(opened))
            info = {"pil_mode": opened.mode}
    except (InputFileError, MemoryError):
        raise
    except Image.DecompressionBombError as error:
        raise InputFileError(path, f"the image declares more pixels than Pillow opens ({error})") from error
    except UnidentifiedImageError as error:
        raise InputFileError(path, "corrupt or truncated image file, or a variant Pillow does not decode "
                             "(e.g. 16- or 64-bit float TIFF)") from error
    except Exception as error:  # Pillow's decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise InputFileError(path, f"corrupt or truncated image file ({type(error).__name__}: {error})") from error
    return MedicalImage(
        array=array,
        modality=None,
        metadata={"format": path.suffix.lower().lstrip("."), "kind": "image", **info},
        **image_geometry_2d(),
    )


def _tiff_sample_bits(image, array: np.ndarray) -> np.ndarray:  # noqa: ANN001 - a PIL image
    """Pillow reads signed 8-bit TIFF samples as unsigned and unsigned 32-bit ones as signed;
    reinterpret their bits so that -3 stays -3 and 3e9 stays 3e9."""
    if image.format != "TIFF":
        return array
    sample_formats = set(np.atleast_1d(image.tag_v2.get(339, 1)).tolist())  # 1 unsigned, 2 signed, 3 float
    bits = set(np.atleast_1d(image.tag_v2.get(258, 8)).tolist())
    if sample_formats == {2} and bits == {8} and array.dtype == np.uint8:
        return array.view(np.int8)
    if sample_formats == {1} and bits == {32} and array.dtype == np.int32:
        return array.view(np.uint32)
    return array


def _pil_to_array(image) -> np.ndarray:  # noqa: ANN001 - a PIL image
    """Convert without losing bit depth: 16-bit stays uint16, palettes and alpha become RGB."""
    mode = image.mode
    if mode in {"L", "I;16", "I;16B", "I;16L", "I", "F"}:
        array = np.asarray(image)
        if mode.startswith("I;16"):
            array = array.astype(np.uint16)
        return array
    if mode == "1":
        return np.asarray(image, dtype=np.uint8)
    if mode == "LA":
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def read_nifti(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> MedicalImage:
    """NIfTI-1/2 as ``(Z, Y, X)`` with its affine converted to LPS array-axis geometry."""
    import nibabel as nib

    try:
        loaded = nib.load(path)
        dtype = loaded.header.get_data_dtype()
        offset = int(loaded.dataobj.offset)
    except MemoryError:
        raise
    except Exception as error:  # nibabel raises many types for truncated or foreign files
        raise InputFileError(path, f"corrupt or truncated NIfTI file ({type(error).__name__}: {error})") from error
    check_dtype(path, dtype)
    declared = check_declared_size(path, loaded.shape, dtype.itemsize, max_bytes, "the NIfTI header")
    _check_nifti_length(path, declared, offset)
    try:
        data = np.asanyarray(loaded.dataobj)
    except MemoryError:
        raise
    except Exception as error:
        raise InputFileError(path, f"corrupt or truncated NIfTI file ({type(error).__name__}: {error})") from error
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise InputFileError(
            path, f"{data.ndim}D image of shape {data.shape}: medfm segments 2D images and 3D volumes, "
            "split time series or channels into separate 3D files first"
        )
    spacing, origin, direction = _geometry_from_ras_affine(loaded.affine)
    return MedicalImage(
        array=np.ascontiguousarray(data.transpose(2, 1, 0)),
        spacing=spacing,
        origin=origin,
        direction=direction,
        modality=None,
        metadata={"format": "nifti", "kind": "volume"},
        native=loaded.header,
    )


def _geometry_from_ras_affine(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    linear = RAS_TO_LPS @ affine[:3, :3] @ IJK_TO_ZYX
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing[None, :]
    origin = RAS_TO_LPS @ affine[:3, 3]
    return tuple(float(s) for s in spacing), tuple(float(o) for o in origin), direction


def ras_affine(image: MedicalImage) -> np.ndarray:
    """The NIfTI (RAS, voxel order i, j, k = X, Y, Z) affine of a volume: inverse of the read."""
    linear = image.direction * np.asarray(image.spacing)[None, :]
    affine = np.eye(4)
    affine[:3, :3] = RAS_TO_LPS @ linear @ IJK_TO_ZYX
    affine[:3, 3] = RAS_TO_LPS @ np.asarray(image.origin)
    return affine


def _check_nifti_length(path: Path, declared: int, offset: int) -> None:
    """Refuse a NIfTI whose file holds less than its header declares, before reading the data.

    For .nii.gz the length is the one the gzip trailer records (modulo 4 GiB, so only checked below).
    """
    size = path.stat().st_size
    if path.name.lower().endswith(".gz"):
        if offset + declared >= 1 << 32:
            return
        with open(path, "rb") as handle:
            handle.seek(max(size - 4, 0))
            size = int.from_bytes(handle.read(4), "little")
    check_data_length(path, declared, size - offset, "the NIfTI pixel data")


#: The keys medfm reads from a challenge .npz; anything else in the archive is left unread.
NPZ_KEYS = ("imgs", "spacing", "boxes")


def read_challenge_npz(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> MedicalImage:
    """CVPR 2024 "MedSAM on Laptop" npz: ``imgs`` (D, H, W) or (H, W, 3), ``boxes``, ``spacing``.

    The challenge stores ``spacing`` as SimpleITK gives it, (x, y, z); medfm keeps it in array-axis
    order (z, y, x). The boxes are kept in ``metadata["boxes"]`` as given.
    """
    contents = _npz_arrays(path, max_bytes)
    if "imgs" not in contents:
        raise InputFileError(path, "no 'imgs' array in the .npz")
    imgs = contents["imgs"]
    is_photo = imgs.ndim == 3 and imgs.shape[-1] == 3 and "spacing" not in contents
    metadata = {"format": "npz", "kind": "image" if is_photo or imgs.ndim == 2 else "volume"}
    if "boxes" in contents:
        check_dtype(path, contents["boxes"].dtype)
        metadata["boxes"] = contents["boxes"].tolist()
    if metadata["kind"] == "image":
        return MedicalImage(array=imgs, metadata=metadata, **image_geometry_2d())
    if imgs.ndim != 3:
        raise InputFileError(path, f"'imgs' has shape {imgs.shape}; expected (D, H, W) or (H, W, 3)")
    spacing = (1.0, 1.0, 1.0)
    if "spacing" in contents:
        stored = contents["spacing"]
        if stored.ndim != 1:
            raise InputFileError(path, f"'spacing' has shape {stored.shape}; expected 3 numbers (x, y, z)")
        check_dtype(path, stored.dtype)
        spacing = finite_numbers(path, "'spacing'", stored, 3, positive=True)[::-1]
    return MedicalImage(
        array=imgs, spacing=spacing, origin=(0.0, 0.0, 0.0), direction=np.eye(3), metadata=metadata
    )


def _npz_arrays(path: Path, max_bytes: int) -> dict[str, np.ndarray]:
    """The `NPZ_KEYS` arrays of an .npz, each header checked (dtype, declared size, length) before loading."""
    try:
        with zipfile.ZipFile(path) as archive:
            check_zip_members(path, archive, max_bytes)
            members = {name[: -len(".npy")]: name for name in archive.namelist() if name.endswith(".npy")}
            for key in NPZ_KEYS:
                if key in members:
                    _check_npy_header(path, archive, members[key], max_bytes)
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in NPZ_KEYS if key in archive.files}
    except (InputFileError, MemoryError):
        raise
    except Exception as error:  # zipfile and numpy raise many types for corrupt, encrypted or foreign archives
        raise InputFileError(path, f"corrupt or unreadable .npz ({type(error).__name__}: {error})") from error


def _check_npy_header(path: Path, archive: zipfile.ZipFile, name: str, max_bytes: int) -> None:
    with archive.open(name) as member:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(member)
        header_bytes = member.tell()
    what = f"'{name[:-4]}'"
    check_dtype(path, dtype)
    declared = math.prod(shape) * dtype.itemsize
    if name == "imgs.npy":
        check_declared_size(path, shape, dtype.itemsize, max_bytes, what)
    check_data_length(path, declared, archive.getinfo(name).file_size - header_bytes, what)


def read_with_simpleitk(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> MedicalImage:
    """NRRD / MHA / MHD through SimpleITK (optional extra ``itk``), headers validated by medfm first."""
    try:
        import SimpleITK as sitk
    except ImportError as error:
        raise MissingDependencyError("SimpleITK", "itk", f"reading {path.suffix} files") from error
    from medfm.io.itk_headers import sitk_image_io

    image_io = sitk_image_io(path, max_bytes)
    try:
        loaded = sitk.ReadImage(str(path), imageIO=image_io)
    except RuntimeError as error:
        raise InputFileError(path, f"SimpleITK could not read it ({str(error).strip().splitlines()[-1]})") from error
    if loaded.GetDimension() != 3 or loaded.GetNumberOfComponentsPerPixel() != 1:
        raise InputFileError(path, "only single-channel 3D NRRD/MHA volumes are supported")
    itk_direction = np.asarray(loaded.GetDirection()).reshape(3, 3)
    return MedicalImage(
        array=sitk.GetArrayFromImage(loaded),
        spacing=tuple(loaded.GetSpacing()[::-1]),
        origin=tuple(loaded.GetOrigin()),
        direction=itk_direction[:, ::-1],
        metadata={"format": path.suffix.lower().lstrip("."), "kind": "volume"},
    )
