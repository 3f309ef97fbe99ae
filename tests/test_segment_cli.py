"""``medfm segment`` end to end with the real LiteMedSAM weights on the bundled samples."""

from __future__ import annotations

import nibabel as nib
import pytest
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
    dice = float(result.stdout.split("Dice vs reference: foreground:")[1].split()[0])  # a 0/255 mask: its foreground
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
                       "--box", str(cols.min()), str(rows.min()), str(cols.max()), str(rows.max()), "-o", str(out),
                       "--reference", str(EXAMPLES / "totalseg_example_ct_mask.nii.gz"))
    assert result.returncode == 0, result.stderr
    # the multi-label reference's liver is label 5: the box is scored against it, on the segmented slice
    assert "label 1 (reference label 5):" in result.stdout
    assert float(result.stdout.split("(reference label 5):")[1].split()[0]) > 0.8
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
    assert float(result.stdout.split("foreground:")[1].split()[0]) > 0.85


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


@needs_litemedsam
def test_segment_volume_from_a_label_map(tmp_path) -> None:
    reference = medfm.read_image(EXAMPLES / "totalseg_example_ct_mask.nii.gz").array
    coarse = tmp_path / "kidney.nii.gz"
    ct = medfm.read_image(EXAMPLES / "totalseg_example_ct.nii.gz")
    medfm.write_mask(np.where(reference == 3, reference, 0), coarse, like=ct)  # the left kidney
    out = tmp_path / "kidneys_medfm.nii.gz"
    result = run_medfm("segment", str(EXAMPLES / "totalseg_example_ct.nii.gz"), "--modality", "CT",
                       "--boxes-from", str(coarse), "-o", str(out), "--reference", str(EXAMPLES / "totalseg_example_ct_mask.nii.gz"))
    assert result.returncode == 0, result.stderr
    dice = dict(part.strip().split(": ") for part in result.stdout.split("Dice vs reference:")[1].split(","))
    assert list(dice) == ["label 3"] and float(dice["label 3"]) > 0.85
    np.testing.assert_allclose(nib.load(out).affine, nib.load(EXAMPLES / "totalseg_example_ct.nii.gz").affine, atol=1e-5)


def test_volume_prompt_errors(tmp_path) -> None:
    """Refused before any model loads: in-process, this takes about a second."""
    volume = str(EXAMPLES / "totalseg_example_ct.nii.gz")
    for args, message in [
        (["--box3d", "0", "0", "0", "500", "50", "10"], "reaches outside the volume"),
        (["--box3d", "0", "0", "9", "50", "50", "3"], "inverted or has an empty range"),
        (["--box3d", "0", "0", "3", "50", "50"], "--box3d takes 6 numbers"),
        (["--box3d", "0", "0", "3", "50", "50", "9", "--slice", "4"], "do not combine"),
    ]:
        result = run_medfm("segment", volume, *args, "-o", str(tmp_path / "m.nii.gz"))
        assert result.returncode == 2 and message in result.stderr, result.stderr
    result = run_medfm("segment", str(EXAMPLES / "busi_benign_001.png"), "--box3d", "0", "0", "0", "5", "5", "0",
                       "-o", str(tmp_path / "m.png"))
    assert result.returncode == 2 and "not a volume" in result.stderr


@needs_litemedsam
def test_segment_bf16_matches_fp32_where_the_cpu_has_bfloat16(tmp_path) -> None:
    from medfm.segment.fast import bf16_supported

    if not bf16_supported():
        pytest.skip("this CPU has no native bfloat16 (AVX512-BF16 or AMX)")
    masks = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.png"
        result = run_medfm("segment", str(EXAMPLES / "busi_benign_001.png"), "--box", "215", "107", "265", "132",
                           "-o", str(out), "--precision", precision)
        assert result.returncode == 0, result.stderr
        masks[precision] = medfm.read_image(out).array > 0
    union = np.logical_or(*masks.values()).sum()
    assert np.logical_and(*masks.values()).sum() / union > 0.98
