"""``medfm segment`` end to end with the real LiteMedSAM weights on the bundled samples."""

from __future__ import annotations

import nibabel as nib
import numpy as np

import medfm
from tests.conftest import EXAMPLES
from tests.test_cli import run_medfm
from tests.test_predictor import needs_litemedsam


@needs_litemedsam
def test_segment_png_with_overlay_and_dice(tmp_path) -> None:
    out, picture = tmp_path / "mask.png", tmp_path / "overlay.png"
    result = run_medfm("segment", str(EXAMPLES / "busi_benign_001.png"), "--box", "215", "107", "265", "132",
                       "-o", str(out), "--overlay", str(picture), "--reference", str(EXAMPLES / "busi_benign_001_mask.png"))
    assert result.returncode == 0, result.stderr
    dice = float(result.stdout.split("label 1:")[1].split()[0])
    assert dice > 0.88
    mask = medfm.read_image(out).array
    assert mask.shape == (416, 416) and set(np.unique(mask)) == {0, 1}
    assert medfm.read_image(picture).array.shape == (416, 416, 3)


@needs_litemedsam
def test_segment_nifti_slice_keeps_the_volume_grid(tmp_path) -> None:
    reference = medfm.read_image(EXAMPLES / "totalseg_example_ct_mask.nii.gz").array
    liver = reference[15] == 5
    rows, cols = np.nonzero(liver)
    out = tmp_path / "liver.nii.gz"
    result = run_medfm("segment", str(EXAMPLES / "totalseg_example_ct.nii.gz"), "--modality", "CT", "--slice", "15",
                       "--box", str(cols.min()), str(rows.min()), str(cols.max()), str(rows.max()), "-o", str(out))
    assert result.returncode == 0, result.stderr
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, nib.load(EXAMPLES / "totalseg_example_ct.nii.gz").affine, atol=1e-5)
    mask = np.asarray(written.dataobj).transpose(2, 1, 0)
    assert mask.shape == reference.shape and not mask[:15].any() and not mask[16:].any()
    overlap = (mask[15] == 1) & liver
    assert 2 * overlap.sum() / (liver.sum() + (mask[15] == 1).sum()) > 0.8


@needs_litemedsam
def test_segment_jpeg(tmp_path) -> None:
    from PIL import Image

    jpeg = tmp_path / "busi.jpg"
    Image.open(EXAMPLES / "busi_benign_001.png").convert("RGB").save(jpeg, quality=95)
    out = tmp_path / "mask.png"
    result = run_medfm("segment", str(jpeg), "--box", "215", "107", "265", "132", "-o", str(out),
                       "--reference", str(EXAMPLES / "busi_benign_001_mask.png"))
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split("label 1:")[1].split()[0]) > 0.85


@needs_litemedsam
def test_segment_dicom_series_to_dicom_seg_and_nifti(tmp_path) -> None:
    import highdicom

    from tests.conftest import write_dicom_series

    ct = medfm.read_image(EXAMPLES / "totalseg_example_ct.nii.gz")
    folder = tmp_path / "series"
    write_dicom_series(ct.array, ct.spacing, ct.origin, ct.direction, folder)
    reference = medfm.read_image(EXAMPLES / "totalseg_example_ct_mask.nii.gz").array
    rows, cols = np.nonzero(reference[15] == 5)
    box = [str(v) for v in (cols.min(), rows.min(), cols.max(), rows.max())]
    seg_path, nifti_path = tmp_path / "liver.dcm", tmp_path / "liver.nii.gz"
    for out in (seg_path, nifti_path):
        result = run_medfm("segment", str(folder), "--slice", "15", "--box", *box, "-o", str(out))
        assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(nib.load(nifti_path).affine, nib.load(EXAMPLES / "totalseg_example_ct.nii.gz").affine, atol=1e-4)
    seg = highdicom.seg.segread(seg_path)
    assert len(seg.SegmentSequence) == 1 and seg.NumberOfFrames >= 1
