"""medfm's own shipped model: medfm-litemedsam-ft, the fine-tuned LiteMedSAM decoder over its base."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import medfm
from medfm.errors import MedfmError
from medfm.catalog import registry
from medfm.segment.model import BUNDLED_DIR, available_models, load
from tests.conftest import EXAMPLES
from tests.test_predictor import needs_litemedsam

FT = "medfm-litemedsam-ft"


def test_the_fine_tune_ships_only_its_trained_tensors_and_a_card() -> None:
    folder = BUNDLED_DIR / FT
    config = json.loads((folder / "config.json").read_text())
    assert config["base"] == "litemedsam" and config["recipe"]["name"] == "decoder" and config["delta"]
    assert (folder / "MODEL_CARD.md").read_text().count("|") > 20  # the per-dataset table
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
    assert keys and all(key.startswith("mask_decoder.") for key in keys)
    assert registry.get(FT).weights == f"bundled:segment/weights/{FT}" and FT in available_models()


@needs_litemedsam
def test_the_fine_tune_loads_over_its_base_and_changes_only_the_decoder() -> None:
    base, tuned = load("litemedsam"), load(FT)
    assert tuned.name == FT and tuned.preprocess == base.preprocess
    tuned_state, base_state = tuned.network.state_dict(), base.network.state_dict()
    changed = {key for key in base_state if not torch.equal(base_state[key], tuned_state[key])}
    assert changed and all(key.startswith("mask_decoder.") for key in changed)


@needs_litemedsam
def test_the_fine_tune_segments_the_bundled_lesion() -> None:
    predictor = load(FT).predictor()
    predictor.set_image(EXAMPLES / "busi_benign_001.png")
    mask = predictor.predict(boxes=[medfm.Box(215, 107, 265, 132)]).masks[0]
    truth = medfm.read_image(EXAMPLES / "busi_benign_001_mask.png").array > 0
    assert 2 * np.logical_and(mask, truth).sum() / (mask.sum() + truth.sum()) > 0.88


def test_a_bundled_model_takes_no_weights() -> None:
    with pytest.raises(MedfmError, match="shipped with medfm"):
        load(FT, weights="elsewhere.pth")


@needs_litemedsam
def test_the_fine_tune_is_the_default_everywhere() -> None:
    from medfm.segment.model import DEFAULT_MODEL
    from tests.test_cli import run_medfm

    assert DEFAULT_MODEL == "medfm-litemedsam-ft" and registry.get(DEFAULT_MODEL).weights_kind == "bundled"
    assert medfm.load().name == DEFAULT_MODEL
    help_text = run_medfm("segment", "--help").stdout
    assert f"(default: {DEFAULT_MODEL})" in " ".join(help_text.replace("│", " ").split())
