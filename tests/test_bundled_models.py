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


CLICKS = "medfm-litemedsam-clicks"
#: datasets where one click has one clear answer (a lesion, an organ, a disc); held out as in the cards
CLICK_DATASETS = ["busi_breast_ultrasound", "covid_cxr_lungs_v7", "hc18_fetal_head_us", "ph2_dermoscopy"]


def test_the_clicks_model_ships_its_prompt_encoder_and_decoder_over_litemedsam() -> None:
    folder = BUNDLED_DIR / CLICKS
    config = json.loads((folder / "config.json").read_text())
    assert config["base"] == "litemedsam" and config["recipe"] == {"name": "decoder", "prompt_encoder": True}
    assert config["trained_prompts"] == ["box", "point"] and registry.get(CLICKS).prompts == ("box", "point")
    assert (folder / "MODEL_CARD.md").read_text().count("|") > 20
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        prefixes = {key.split(".")[0] for key in weights.keys()}
    assert prefixes == {"mask_decoder", "prompt_encoder"}


@needs_litemedsam
def test_the_clicks_model_answers_one_click_where_the_box_model_cannot(seg_data) -> None:
    """Held-out cases of the cards' split: one centre click gives the clicks model a real mask and the
    box-trained default almost nothing, while their box Dice stay close."""
    from medfm.data.datasets import discover_cases, split_cases
    from medfm.evaluate.runner import evaluate

    held_out = split_cases(discover_cases(seg_data, CLICK_DATASETS, 100), 0.2, 0, 4)[1]
    cases = [c for d in CLICK_DATASETS for c in [c for c in held_out if c.dataset == d][:2]]
    assert len(cases) == 2 * len(CLICK_DATASETS)
    rows = evaluate([load(FT), load(CLICKS)], cases, prompt=["points:1", "box"]).rows
    mean = {(m, p): float(np.mean([r.dice for r in rows if (r.model, r.prompt) == (m, p) and r.note is None]))
            for m in (FT, CLICKS) for p in ("points:1", "box")}
    assert mean[(CLICKS, "points:1")] > 0.6 and mean[(FT, "points:1")] < 0.2, mean
    assert mean[(CLICKS, "box")] > mean[(FT, "box")] - 0.02, mean
