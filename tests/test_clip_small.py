"""medfm-clip-small (the shipped default), the shared data's split, and the classify / retrieve commands."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

import medfm
from medfm.clip.data import DATASETS, is_held_out, read_records, training_texts
from medfm.clip.model import WEIGHTS_DIR
from tests.conftest import EXAMPLES
from tests.test_cli import run_medfm

SMALL = WEIGHTS_DIR / "medfm-clip-small"


def test_shipped_model_is_small_and_names_its_frozen_towers() -> None:
    config = json.loads((SMALL / "config.json").read_text())
    assert config["image_backbone"]["kind"] == "litemedsam" and config["text_backbone"]["kind"] == "minilm"
    assert config["preprocess"]["image_size"] == 112 and config["task"] == "zero-shot-classification"
    assert (SMALL / "model.safetensors").stat().st_size < 30e6 and "Zero-shot" in (SMALL / "README.md").read_text()


def test_default_model_classifies_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDFM_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    probabilities = medfm.classify(EXAMPLES / "busi_benign_001.png", ["melanoma", "pneumonia", "normal"])
    assert list(probabilities) == ["melanoma", "pneumonia", "normal"]
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_held_out_split_is_deterministic_and_keeps_patients_and_lesions_apart(vl_data: Path) -> None:
    for dataset in DATASETS:
        records = read_records(vl_data, dataset)
        sides = defaultdict(set)
        for record in records:
            sides[record.group].add(is_held_out(record))
        assert all(len(s) == 1 for s in sides.values()), dataset
        share = sum(is_held_out(r) for r in records) / len(records)
        assert 0.1 < share < 0.3, (dataset, share)
    covid = read_records(vl_data, "covid_cxr_notes")[0]
    texts = dict(training_texts(covid))
    assert covid.texts[0] in texts and any(t.startswith("no COVID-19") or "COVID-19" in t for t in texts)


def test_real_images_get_their_class(vl_data: Path) -> None:
    """A sanity check on two held-out pneumonia X-rays and two held-out melanomas (the table in the
    README has the measured accuracies)."""
    model = medfm.clip.load("medfm-clip-small")
    picks = {"pneumoniamnist": ("pneumonia", ["pneumonia", "normal"]), "ham10000_skin": ("melanoma", ["melanoma", "melanocytic nevus"])}
    for dataset, (label, labels) in picks.items():
        records = [r for r in read_records(vl_data, dataset) if is_held_out(r) and label in r.labels][:2]
        for record in records:
            probabilities = medfm.classify(record.image, labels, model=model)
            assert set(probabilities) == set(labels) and sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_spread_multi_value_options() -> None:
    from medfm.cli import spread_multi_value_options

    argv = ["classify", "x.png", "--labels", "pleural effusion", "normal", "--json", "--model", "m"]
    assert spread_multi_value_options(argv) == ["classify", "x.png", "--labels", "pleural effusion", "--labels", "normal",
                                                "--json", "--model", "m"]


def test_classify_and_retrieve_commands(tmp_path: Path) -> None:
    result = run_medfm("classify", str(EXAMPLES / "busi_benign_001.png"), "--labels", "breast lesion", "pneumonia", "--json")
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) == {"breast lesion", "pneumonia"}
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(EXAMPLES / "busi_benign_001.png", folder / name)
    result = run_medfm("retrieve", "--text", "ultrasound of a breast lesion", "--images", str(folder), "--top", "1", "--json")
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)
    assert len(hits) == 1 and Path(hits[0]["image"]).parent == folder
    result = run_medfm("classify", str(EXAMPLES / "busi_benign_001.png"), "--labels", "pneumonia")
    assert result.returncode == 2 and "two or more labels" in result.stderr and "Traceback" not in result.stderr
