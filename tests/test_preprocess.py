"""Checkpoint preprocessing and its inverse, with values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfm.intensity import preset
from medfm.preprocess import (
    LITEMEDSAM_PREPROCESS,
    MEDSAM_PREPROCESS,
    SAM_PREPROCESS,
    PreprocessConfig,
    prepare,
    resized_shape,
    to_uint8_rgb,
)


def test_resized_shape_rounds_half_up_like_segment_anything() -> None:
    assert resized_shape((416, 416), LITEMEDSAM_PREPROCESS) == (256, 256)
    assert resized_shape((369, 273), LITEMEDSAM_PREPROCESS) == (256, 189)  # 273 * 256 / 369 = 189.4
    assert resized_shape((157, 156), LITEMEDSAM_PREPROCESS) == (256, 254)  # enlarging: 254.37
    assert resized_shape((300, 500), SAM_PREPROCESS) == (614, 1024)  # 300 * 1024 / 500 = 614.4
    assert resized_shape((300, 500), MEDSAM_PREPROCESS) == (1024, 1024)


def test_prepare_minmax_pads_with_zeros() -> None:
    rgb = np.zeros((100, 50, 3), np.uint8)
    rgb[:, :25] = 200
    rgb[:, 25:] = 100
    pixels, geometry = prepare(rgb, LITEMEDSAM_PREPROCESS)
    assert pixels.shape == (1, 3, 256, 256) and pixels.dtype == torch.float32
    assert geometry.resized_hw == (256, 128)
    assert pixels[0, :, :, :60].min() == 1.0 and pixels[0, :, :, 68:128].max() == 0.0  # min-max of 100..200
    assert not pixels[0, :, :, 128:].any()  # padding


def test_prepare_mean_std_for_sam() -> None:
    rgb = np.full((10, 20, 3), 128, np.uint8)
    pixels, geometry = prepare(rgb, SAM_PREPROCESS)
    expected = (128 - np.array(SAM_PREPROCESS.pixel_mean)) / np.array(SAM_PREPROCESS.pixel_std)
    np.testing.assert_allclose(pixels[0, :, 0, 0].numpy(), expected, rtol=1e-6)
    assert geometry.resized_hw == (512, 1024) and not pixels[0, :, 600:, :].any()


def test_boxes_follow_each_checkpoint_convention() -> None:
    _, lite = prepare(np.zeros((416, 416, 3), np.uint8), LITEMEDSAM_PREPROCESS)
    # 256 / 416 = 0.615...: (215, 107, 265, 132) -> (132.3, 65.8, 163.08, 81.2), truncated
    np.testing.assert_array_equal(lite.boxes_to_model([215, 107, 265, 132]), [[132, 65, 163, 81]])
    _, sam = prepare(np.zeros((300, 500, 3), np.uint8), SAM_PREPROCESS)
    np.testing.assert_allclose(sam.boxes_to_model([100, 50, 200, 150]), [[204.8, 50 * 614 / 300, 409.6, 150 * 614 / 300]])
    np.testing.assert_allclose(sam.points_to_model([[250, 150]]), [[512, 307]])


@pytest.mark.parametrize("config", [LITEMEDSAM_PREPROCESS, SAM_PREPROCESS, MEDSAM_PREPROCESS])
def test_logits_return_to_the_input_grid(config: PreprocessConfig) -> None:
    """A logit map that is positive on the left part of the resized image comes back positive on
    the same part of the input (the inverse mapping is consistent with the forward one)."""
    height, width = 90, 160
    _, geometry = prepare(np.zeros((height, width, 3), np.uint8), config)
    low = torch.full((1, 1, 256, 256), -10.0)
    new_w_low = round(geometry.resized_hw[1] * 256 / config.image_size)
    low[..., : new_w_low // 2] = 10.0
    logits = geometry.logits_to_input(low)[0, 0].numpy()
    assert logits.shape == (height, width)
    positive_columns = np.nonzero((logits > 0).all(axis=0))[0]
    assert abs(len(positive_columns) - width / 2) <= 2 and positive_columns[0] == 0


def test_to_uint8_rgb() -> None:
    photo = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(to_uint8_rgb(photo)[..., 1], photo)
    hu = np.array([[-1000, -160, 40, 240]], dtype=np.int16)
    np.testing.assert_array_equal(to_uint8_rgb(hu, modality="CT")[0, :, 0], [0, 0, 128, 255])  # 127.5 rounds to 128
    np.testing.assert_array_equal(to_uint8_rgb(hu, preset("lung"))[0, :, 0], np.round(np.clip((hu[0] + 1350) / 1500, 0, 1) * 255))
    assert to_uint8_rgb(np.zeros((2, 5, 6), np.int16)).shape == (2, 5, 6, 3)


def test_config_round_trips_through_json() -> None:
    assert PreprocessConfig.from_dict(SAM_PREPROCESS.to_dict()) == SAM_PREPROCESS
    with pytest.raises(ValueError, match="unknown preprocessing option"):
        PreprocessConfig(resize="crop")


@pytest.mark.parametrize("modality,preset_name", [("CT", None), ("MR", None), ("CT", "lung"), (None, None)])
def test_slice_by_slice_conversion_equals_the_whole_volume(modality, preset_name) -> None:
    from medfm.intensity import preset
    from medfm.preprocess import SliceValues, uint8_rgb_converter

    rng = np.random.default_rng(0)
    volume = (rng.normal(0, 400, (6, 20, 24)) if modality == "CT" else rng.gamma(2.0, 150.0, (6, 20, 24))).astype(np.float32)
    volume[:, :3] = 0  # MR background, left out of the percentiles
    chosen = preset(preset_name) if preset_name else None
    whole = to_uint8_rgb(volume, chosen, modality)
    lazy = SliceValues(volume, uint8_rgb_converter(volume, chosen, modality))
    assert len(lazy) == 6
    for z in range(-6, 6):
        np.testing.assert_array_equal(lazy[z], whole[z])
    # statistics come from the whole volume, not the slice: one slice alone converts differently
    if modality == "MR":
        assert not np.array_equal(to_uint8_rgb(volume[2], chosen, modality), whole[2])


def test_a_volume_is_converted_only_where_slices_are_encoded(monkeypatch) -> None:
    import medfm.preprocess
    from tests.test_predictor import TINY_TINYVIT

    from medfm.io import MedicalImage
    from medfm.preprocess import LITEMEDSAM_PREPROCESS
    from medfm.segment.model import SegmentationModel
    from medfm.segment.sam import build_sam

    converted = []
    original = medfm.preprocess.SliceValues.__getitem__
    monkeypatch.setattr(medfm.preprocess.SliceValues, "__getitem__", lambda self, i: converted.append(i) or original(self, i))
    network = build_sam("litemedsam", encoder=TINY_TINYVIT, decoder_mlp_dim=64).eval()
    predictor = SegmentationModel(network, LITEMEDSAM_PREPROCESS, "tiny", "litemedsam").predictor()
    volume = MedicalImage(array=np.zeros((40, 32, 32), np.int16), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                          direction=np.eye(3), modality="CT", metadata={"kind": "volume"})
    predictor.set_image(volume, slice_index=7)
    list(predictor.encode_slices(volume, [8, 9]))
    assert converted == [7, 8, 9]


def test_every_resize_kernel_is_the_library_it_names() -> None:
    """The kernels `benchmarks/resize_kernels.py` compares: OpenCV's, and torch's antialiased
    bilinear kept in float (no rounding back to uint8)."""
    import dataclasses

    import cv2
    import torch.nn.functional as F

    rgb = np.random.default_rng(0).integers(0, 256, (97, 61, 3), dtype=np.uint8)
    flags = {"area": cv2.INTER_AREA, "nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
    results = {}
    for kernel in (*flags, "torch-bilinear-aa"):
        config = dataclasses.replace(LITEMEDSAM_PREPROCESS, image_size=32, normalization="mean-std",
                                     pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0), interpolation=kernel)
        pixels, geometry = prepare(rgb, config)
        h, w = geometry.resized_hw
        results[kernel] = pixels[0, :, :h, :w].permute(1, 2, 0).numpy()
        if kernel in flags:
            expected = cv2.resize(rgb, (w, h), interpolation=flags[kernel]).astype(np.float32)
        else:
            tensor = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None]
            expected = F.interpolate(tensor, (h, w), mode="bilinear", antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(results[kernel], expected, atol=1e-4)
    assert not np.allclose(results["area"], results["torch-bilinear-aa"])  # they really differ
    assert not np.array_equal(results["torch-bilinear-aa"], np.round(results["torch-bilinear-aa"]))  # kept in float
