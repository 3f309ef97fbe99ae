"""Shared fixtures: where the real data lies, and a builder of real DICOM series for round trips."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SHARED_DATA = Path(os.environ.get("MEDFM_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_folder(name: str) -> Path:
    """``../shared/data/<name>``; tests that need it skip on a user's clone, which has no ``../shared``."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"real data folder {folder} is absent (only the project's machines have ../shared)")
    return folder


@pytest.fixture(scope="session")
def seg_data() -> Path:
    """``../shared/data/seg`` (segmentation cases)."""
    return shared_folder("seg")


@pytest.fixture(scope="session")
def vl_data() -> Path:
    """``../shared/data/vl`` (images with labels and reports)."""
    return shared_folder("vl")


def write_dicom_series(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    direction: np.ndarray,
    folder: Path,
    *,
    intercept: float = -2048.0,
    series_uid: str | None = None,
    modality: str = "CT",
    file_names: list[str] | None = None,
) -> list[Path]:
    """Write a (Z, Y, X) volume in stored = (value - intercept) form as one CT/MR DICOM file per slice.

    Geometry is LPS in array-axis order (medfm's convention); the files are named in a scrambled
    order so that readers must sort by position, not by name.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    stored = np.round(volume - intercept).astype(np.uint16)  # the intercept keeps every value >= 0
    row_cosine, column_cosine = direction[:, 2], direction[:, 1]
    paths = []
    rng = np.random.default_rng(0)
    names = file_names or [f"IM{n:04d}.dcm" for n in rng.permutation(len(volume))]
    for z, name in enumerate(names):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "TEST001", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.Manufacturer = "", "medfm-tests"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, z + 1
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + z * spacing[0] * direction[:, 0]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_cosine, *column_cosine)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = intercept, 1.0
        ds.PixelData = stored[z].tobytes()
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
