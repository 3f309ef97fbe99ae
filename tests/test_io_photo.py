"""PNG / JPEG / TIFF / BMP in, PNG and npz masks out, on the bundled and the shared real files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import medfm
from medfm.errors import InputFileError, OutputFileError
from tests.conftest import EXAMPLES


def test_bundled_png_reads_as_grey_2d() -> None:
    image = medfm.read_image(EXAMPLES / "busi_benign_001.png")
    assert image.array.shape == (416, 416) and image.array.dtype == np.uint8
    assert not image.is_volume and image.spacing == (1.0, 1.0) and image.channels == 1
    assert image.path == EXAMPLES / "busi_benign_001.png"


def test_real_jpeg_and_rgb_png(seg_data) -> None:
    jpeg = next((seg_data / "hc18_fetal_head_us" / "images").glob("*.jpg"))
    assert medfm.read_image(jpeg).array.ndim == 2
    rgb = medfm.read_image(next((seg_data / "ph2_dermoscopy" / "images").iterdir()))
    assert rgb.array.ndim == 3 and rgb.array.shape[2] == 3 and rgb.channels == 3


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_values_survive(tmp_path, suffix) -> None:
    values = (np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 13) % 65535
    path = tmp_path / f"sixteen{suffix}"
    Image.fromarray(values).save(path)
    image = medfm.read_image(path)
    assert image.array.dtype == np.uint16
    np.testing.assert_array_equal(image.array, values)


@pytest.mark.parametrize("mode,suffix", [("RGB", ".bmp"), ("RGBA", ".png"), ("P", ".png"), ("L", ".tiff")])
def test_other_modes_become_grey_or_rgb(tmp_path, mode, suffix) -> None:
    path = tmp_path / f"image{suffix}"
    Image.new(mode, (30, 20)).save(path)
    array = medfm.read_image(path).array
    assert array.shape in {(20, 30), (20, 30, 3)}


def test_png_mask_round_trip_is_exact_and_atomic(tmp_path) -> None:
    like = medfm.read_image(EXAMPLES / "busi_benign_001.png")
    truth = np.asarray(Image.open(EXAMPLES / "busi_benign_001_mask.png"))
    out = medfm.write_mask(truth * 3, tmp_path / "sub" / "mask.png", like=like)
    np.testing.assert_array_equal(medfm.read_image(out).array, truth * 3)
    assert sorted(p.name for p in out.parent.iterdir()) == ["mask.png"]  # no temporary left behind


def test_npz_mask_has_segs(tmp_path) -> None:
    mask = np.zeros((5, 6, 7), np.uint8)
    mask[2, 3, 4] = 2
    out = medfm.write_mask(mask, tmp_path / "case.npz")
    with np.load(out) as archive:
        np.testing.assert_array_equal(archive["segs"], mask)


def test_writer_refuses_to_overwrite_the_input(tmp_path) -> None:
    source = tmp_path / "scan.png"
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(source)
    image = medfm.read_image(source)
    with pytest.raises(OutputFileError, match="over an input"):
        medfm.write_mask(np.zeros((8, 8), np.uint8), source, like=image)
    assert np.all(np.asarray(Image.open(source)) == 7)


def test_mask_of_the_wrong_shape_is_refused(tmp_path) -> None:
    like = medfm.read_image(EXAMPLES / "busi_benign_001.png")
    with pytest.raises(OutputFileError, match="differs from the image's grid"):
        medfm.write_mask(np.zeros((10, 10), np.uint8), tmp_path / "m.png", like=like)
    with pytest.raises(OutputFileError, match="unknown output type"):
        medfm.write_mask(np.zeros((416, 416), np.uint8), tmp_path / "m.jpg", like=like)


def test_failed_write_leaves_no_partial_file(tmp_path) -> None:
    with pytest.raises(OutputFileError):
        medfm.write_mask(np.zeros((2, 3, 4), np.uint8), tmp_path / "m.png")
    assert list(tmp_path.iterdir()) == []


def test_bad_photo_inputs_name_the_file(tmp_path) -> None:
    real = (EXAMPLES / "busi_benign_001.png").read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(real[: len(real) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00not an image at all" * 10)
    for path, problem in [
        (truncated, "corrupt or truncated"),
        (garbage, "corrupt or truncated"),
        (tmp_path / "missing.png", "no such file"),
    ]:
        with pytest.raises(InputFileError, match=problem) as raised:
            medfm.read_image(path)
        assert str(path) in str(raised.value)
    unknown = tmp_path / "notes.txt"
    unknown.write_text("hello")
    with pytest.raises(InputFileError, match="unknown file type"):
        medfm.read_image(unknown)


def test_zero_sized_image_is_an_error(tmp_path) -> None:
    path = tmp_path / "empty.npz"
    np.savez(path, imgs=np.zeros((0, 16), np.uint8))
    with pytest.raises(InputFileError, match="empty"):
        medfm.read_image(path)


def test_challenge_npz_reads_volume_and_boxes(tmp_path) -> None:
    path = tmp_path / "CT_case.npz"
    imgs = np.random.default_rng(0).integers(0, 255, (4, 32, 48), dtype=np.uint8)
    np.savez_compressed(path, imgs=imgs, boxes=np.array([[1, 2, 0, 10, 12, 3]]), spacing=np.array([0.8, 0.7, 2.5]))
    image = medfm.read_image(path)
    assert image.is_volume and image.spacing == (2.5, 0.7, 0.8)
    assert image.metadata["boxes"] == [[1, 2, 0, 10, 12, 3]]
    np.testing.assert_array_equal(image.array, imgs)
