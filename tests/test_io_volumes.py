"""NIfTI and DICOM in and out, with geometry checked on real volumes."""

from __future__ import annotations

import zipfile

import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file

import medfm
from medfm.errors import InputFileError
from tests.conftest import EXAMPLES, write_dicom_series

CT = EXAMPLES / "totalseg_example_ct.nii.gz"
CT_MASK = EXAMPLES / "totalseg_example_ct_mask.nii.gz"


def test_nifti_reads_as_zyx_with_lps_geometry() -> None:
    image = medfm.read_image(CT)
    source = nib.load(CT)
    assert image.array.shape == source.shape[::-1] == (30, 101, 122)
    np.testing.assert_array_equal(image.array, np.asarray(source.dataobj).transpose(2, 1, 0))
    assert image.spacing == (3.0, 3.0, 3.0)
    # voxel (i, j, k) of the file is array[k, j, i]; both must land on the same world point (LPS = RAS * (-1, -1, 1))
    i, j, k = 17, 40, 9
    ras = source.affine @ [i, j, k, 1]
    lps = image.affine @ [k, j, i, 1]
    np.testing.assert_allclose(lps[:3], ras[:3] * [-1, -1, 1], atol=1e-6)


@pytest.mark.parametrize("name", ["totalseg_example_ct", "pyradiomics_brain1_mri", "pyradiomics_breast1_mri"])
def test_nifti_mask_written_like_the_image_matches_the_reference_mask(seg_data, tmp_path, name) -> None:
    folder = seg_data / "volumes3d_ct_mri"
    image = medfm.read_image(folder / "images" / f"{name}.nii.gz")
    mask = medfm.read_image(folder / "masks" / f"{name}.nii.gz").array
    out = medfm.write_mask(mask, tmp_path / "mask.nii.gz", like=image)
    written, reference = nib.load(out), nib.load(folder / "masks" / f"{name}.nii.gz")
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(reference.dataobj))
    assert written.get_data_dtype() == np.uint8


def test_oblique_anisotropic_nifti_geometry_round_trips(tmp_path) -> None:
    angle = np.deg2rad(17)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.9, 5.0])
    affine[:3, 3] = [-12.5, 30.0, 4.0]
    data = np.random.default_rng(1).normal(size=(20, 16, 6)).astype(np.float32)
    source = tmp_path / "oblique.nii"
    nib.save(nib.Nifti1Image(data, affine), source)
    image = medfm.read_image(source)
    assert image.spacing == pytest.approx((5.0, 0.9, 0.7))
    out = medfm.write_mask((image.array > 0).astype(np.uint8), tmp_path / "mask.nii", like=image)
    np.testing.assert_allclose(nib.load(out).affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), (data > 0).astype(np.uint8))


def test_bad_nifti_inputs(tmp_path) -> None:
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(CT.read_bytes()[:20000])
    with pytest.raises(InputFileError, match="corrupt or truncated NIfTI") as raised:
        medfm.read_image(truncated)
    assert str(truncated) in str(raised.value)
    nan_volume = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.nan, np.float32), np.eye(4)), nan_volume)
    with pytest.raises(InputFileError, match="NaN"):
        medfm.read_image(nan_volume)
    four_d = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.int16), np.eye(4)), four_d)
    with pytest.raises(InputFileError, match="4D image"):
        medfm.read_image(four_d)
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 0, 4), np.int16), np.eye(4)), empty)
    with pytest.raises(InputFileError, match="empty"):
        medfm.read_image(empty)


def test_single_dicom_files_from_pydicom() -> None:
    import pydicom

    ct_path = get_testdata_file("CT_small.dcm")
    image = medfm.read_image(ct_path)
    raw = pydicom.dcmread(ct_path)
    expected = raw.pixel_array * float(raw.RescaleSlope) + float(raw.RescaleIntercept)
    np.testing.assert_array_equal(image.array, expected)
    assert image.modality == "CT" and image.spacing == tuple(float(s) for s in raw.PixelSpacing)
    dose = medfm.read_image(get_testdata_file("rtdose.dcm"))
    assert dose.is_volume and dose.array.shape[0] == int(pydicom.dcmread(get_testdata_file("rtdose.dcm")).NumberOfFrames)
    rgb = medfm.read_image(get_testdata_file("SC_rgb_small_odd.dcm"))
    assert rgb.array.ndim == 3 and rgb.array.shape[-1] == 3


def test_bad_dicom_files(tmp_path) -> None:
    with pytest.raises(InputFileError, match="PixelData is truncated") as raised:
        medfm.read_image(get_testdata_file("MR_truncated.dcm"))
    assert "MR_truncated.dcm" in str(raised.value)
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"\x00" * 300)
    with pytest.raises(InputFileError, match="not a valid DICOM"):
        medfm.read_image(fake)
    with pytest.raises(InputFileError, match="no pixel data"):
        medfm.read_image(get_testdata_file("rtplan.dcm"))


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory):
    """The bundled real CT, written as a DICOM series (one file per slice, names scrambled)."""
    image = medfm.read_image(CT)
    folder = tmp_path_factory.mktemp("series") / "ct"
    write_dicom_series(image.array, image.spacing, image.origin, image.direction, folder)
    return image, folder


def test_dicom_series_round_trip_keeps_hu_and_geometry(ct_series) -> None:
    original, folder = ct_series
    image = medfm.read_image(folder)
    np.testing.assert_array_equal(image.array, original.array)
    assert image.array.dtype == np.int16 and image.modality == "CT"
    np.testing.assert_allclose(image.spacing, original.spacing)
    np.testing.assert_allclose(image.origin, original.origin, atol=1e-4)
    np.testing.assert_allclose(image.direction, original.direction, atol=1e-6)
    assert len(image.metadata["source_files"]) == 30


def test_zipped_series_and_nifti_output_from_dicom(ct_series, tmp_path) -> None:
    original, folder = ct_series
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in folder.iterdir():
            zipped.write(file, f"study/{file.name}")
    image = medfm.read_image(archive)
    np.testing.assert_array_equal(image.array, original.array)
    mask = medfm.read_image(CT_MASK).array
    out = medfm.write_mask(mask, tmp_path / "mask.nii.gz", like=image)
    np.testing.assert_allclose(nib.load(out).affine, nib.load(CT_MASK).affine, atol=1e-4)


def test_dicom_folder_errors(ct_series, tmp_path) -> None:
    original, _ = ct_series
    mixed = tmp_path / "mixed"
    write_dicom_series(original.array[:3], original.spacing, original.origin, original.direction, mixed,
                       file_names=["a1.dcm", "a2.dcm", "a3.dcm"])
    write_dicom_series(original.array[:3], original.spacing, original.origin, original.direction, mixed,
                       file_names=["b1.dcm", "b2.dcm", "b3.dcm"])
    with pytest.raises(InputFileError, match="holds 2 DICOM series"):
        medfm.read_image(mixed)
    gap = tmp_path / "gap"
    files = write_dicom_series(original.array[:6], original.spacing, original.origin, original.direction, gap)
    files[2].unlink()  # files come in slice order: drop an inner slice, as a failed transfer would
    with pytest.raises(InputFileError, match="unevenly spaced"):
        medfm.read_image(gap)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not dicom")
    with pytest.raises(InputFileError, match="no DICOM files"):
        medfm.read_image(empty)


def test_dicom_seg_references_the_source_series(ct_series, tmp_path) -> None:
    highdicom = pytest.importorskip("highdicom")
    _, folder = ct_series
    image = medfm.read_image(folder)
    mask = medfm.read_image(CT_MASK).array
    mask = np.where(np.isin(mask, [1, 5]), mask, 0)  # spleen and liver
    out = medfm.write_mask(mask, tmp_path / "seg.dcm", like=image, label_names={1: "spleen", 5: "liver"})
    seg = highdicom.seg.segread(out)
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["spleen", "liver"]
    referenced = {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
    assert referenced == {d.SOPInstanceUID for d in image.native}
    source_uids = [d.SOPInstanceUID for d in image.native]
    labels = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids, combine_segments=True, relabel=True)
    expected = np.select([mask == 1, mask == 5], [1, 2], 0)
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_formats_agree_with_nifti_geometry(tmp_path, suffix) -> None:
    sitk = pytest.importorskip("SimpleITK")
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(CT)), str(path))
    via_itk, via_nifti = medfm.read_image(path), medfm.read_image(CT)
    np.testing.assert_array_equal(via_itk.array, via_nifti.array)
    np.testing.assert_allclose(via_itk.affine, via_nifti.affine, atol=1e-4)
