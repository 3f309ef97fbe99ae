"""Readers: every supported file kind becomes a `MedicalImage` with its geometry, or a clear error.

``read_image`` dispatches on the path: a folder (DICOM series), ``.zip`` (a zipped DICOM series),
``.nii``/``.nii.gz``, ``.dcm`` or any file with the DICOM preamble, ``.npz`` (CVPR 2024 "MedSAM on
Laptop"), PNG/JPEG/TIFF/BMP, and NRRD/MHA when SimpleITK is installed.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from os import PathLike
from pathlib import Path

import numpy as np

from medfm.errors import InputFileError, MissingDependencyError
from medfm.io.image import RAS_TO_LPS, MedicalImage, image_geometry_2d

PHOTO_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = {".nrrd", ".nhdr", ".mha", ".mhd"}

#: Permutation between NIfTI voxel indices (i, j, k) and medfm's array axes (Z, Y, X) = (k, j, i).
#: It is its own inverse.
IJK_TO_ZYX = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def read_image(
    path: str | PathLike[str], *, modality: str | None = None, series_uid: str | None = None
) -> MedicalImage:
    """Read a medical image file (or DICOM folder / zip) into a `MedicalImage`.

    ``modality`` overrides the one stored in the file (PNG and NIfTI store none), e.g. ``"CT"``
    so that CT windows apply. ``series_uid`` picks one series from a folder holding several.
    Raises `InputFileError` naming the file for anything missing, corrupt or unsupported.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "no such file or folder")
    reader = _reader_for(path)
    if reader is _read_dicom_folder or reader is _read_dicom_zip:
        image = reader(path, series_uid=series_uid)
    else:
        image = reader(path)
    image.path = path
    if modality is not None:
        image.modality = modality
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


def _read_dicom_folder(path: Path, series_uid: str | None = None) -> MedicalImage:
    from medfm.io import dicom

    return dicom.read_dicom_series(path, series_uid=series_uid)


def _read_dicom_zip(path: Path, series_uid: str | None = None) -> MedicalImage:
    from medfm.io import dicom

    return dicom.read_dicom_zip(path, series_uid=series_uid)


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


def read_photo(path: Path) -> MedicalImage:
    """PNG / JPEG / TIFF / BMP: 8- or 16-bit, grey ``(H, W)`` or colour ``(H, W, 3)``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            frames = getattr(opened, "n_frames", 1)
            if frames > 1:
                raise InputFileError(path, f"multi-page image with {frames} pages; save one page per file")
            opened.load()
            array = _pil_to_array(opened)
            info = {"pil_mode": opened.mode}
    except InputFileError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, zlib.error) as error:
        raise InputFileError(path, f"corrupt or truncated image file ({error})") from error
    return MedicalImage(
        array=array,
        modality=None,
        metadata={"format": path.suffix.lower().lstrip("."), "kind": "image", **info},
        **image_geometry_2d(),
    )


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


def read_nifti(path: Path) -> MedicalImage:
    """NIfTI-1/2 as ``(Z, Y, X)`` with its affine converted to LPS array-axis geometry."""
    import nibabel as nib

    try:
        loaded = nib.load(path)
        data = np.asanyarray(loaded.dataobj)
    except Exception as error:  # nibabel raises many types for truncated or foreign files
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


def read_challenge_npz(path: Path) -> MedicalImage:
    """CVPR 2024 "MedSAM on Laptop" npz: ``imgs`` (D, H, W) or (H, W, 3), ``boxes``, ``spacing``.

    The challenge stores ``spacing`` as SimpleITK gives it, (x, y, z); medfm keeps it in array-axis
    order (z, y, x). The boxes are kept in ``metadata["boxes"]`` as given.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            contents = {key: archive[key] for key in archive.files}
    except Exception as error:
        raise InputFileError(path, f"corrupt or unreadable .npz ({type(error).__name__}: {error})") from error
    if "imgs" not in contents:
        raise InputFileError(path, f"no 'imgs' array in the .npz (it has {sorted(contents)})")
    imgs = contents["imgs"]
    is_photo = imgs.ndim == 3 and imgs.shape[-1] == 3 and "spacing" not in contents
    metadata = {"format": "npz", "kind": "image" if is_photo or imgs.ndim == 2 else "volume"}
    if "boxes" in contents:
        metadata["boxes"] = contents["boxes"].tolist()
    if metadata["kind"] == "image":
        return MedicalImage(array=imgs, metadata=metadata, **image_geometry_2d())
    if imgs.ndim != 3:
        raise InputFileError(path, f"'imgs' has shape {imgs.shape}; expected (D, H, W) or (H, W, 3)")
    spacing = tuple(float(s) for s in contents["spacing"][::-1]) if "spacing" in contents else (1.0, 1.0, 1.0)
    if len(spacing) != 3:
        raise InputFileError(path, f"'spacing' has {len(spacing)} values; expected 3")
    return MedicalImage(
        array=imgs, spacing=spacing, origin=(0.0, 0.0, 0.0), direction=np.eye(3), metadata=metadata
    )


def read_with_simpleitk(path: Path) -> MedicalImage:
    """NRRD / MHA / MHD through SimpleITK (optional extra ``itk``)."""
    try:
        import SimpleITK as sitk
    except ImportError as error:
        raise MissingDependencyError("SimpleITK", "itk", f"reading {path.suffix} files") from error
    try:
        loaded = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputFileError(path, f"SimpleITK could not read it ({error})") from error
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
