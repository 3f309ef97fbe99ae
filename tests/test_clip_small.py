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


def _training_script():
    """scripts/train_clip_small.py as a module (its sampling and prompt loss are tested here)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_clip_small.py"
    spec = importlib.util.spec_from_file_location("train_clip_small", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_validation_part_is_deterministic_inside_the_training_side(vl_data: Path) -> None:
    from medfm.clip.data import TASKS, is_validation

    for dataset in DATASETS:
        training = [r for r in read_records(vl_data, dataset) if not is_held_out(r)]
        sides = defaultdict(set)
        for record in training:
            sides[record.group].add(is_validation(record))
        assert all(len(s) == 1 for s in sides.values()), dataset
        validation = [r for r in training if is_validation(r)]
        assert 0.1 < len(validation) / len(training) < 0.3, dataset
        # the two splits are independent hashes: the validation part is not the held-out part again
        assert not any(is_held_out(r) for r in validation)
        targets = {TASKS[dataset].target(r) for r in validation}
        assert targets == set(range(len(TASKS[dataset].labels))), (dataset, targets)


def test_task_labels_and_targets() -> None:
    from medfm.clip.data import TASKS, VLRecord

    covid = TASKS["covid_cxr_notes"]
    assert covid.labels == ("COVID-19", "no COVID-19")
    record = VLRecord("covid_cxr_notes", "a", Path("a.jpg"), "X-ray", ("ARDS",), "p1")
    assert covid.target(record) == 1
    isic = TASKS["isic2017_skin"]
    melanoma = VLRecord("isic2017_skin", "b", Path("b.jpg"), "dermoscopy", ("melanoma",), "b")
    assert isic.labels[isic.target(melanoma)] == "melanoma"


def test_balanced_sampling_weights() -> None:
    from medfm.clip.data import VLRecord

    script = _training_script()

    def record(dataset: str, label: str, i: int) -> VLRecord:
        return VLRecord(dataset, f"{dataset}{i}", Path("x.jpg"), "dermoscopy", (label,), str(i))

    records = ([record("isic2017_skin", "benign nevus or seborrheic keratosis", i) for i in range(8)]
               + [record("isic2017_skin", "melanoma", 10 + i) for i in range(2)]
               + [record("ham10000_skin", "melanoma", 20 + i) for i in range(5)])
    assert script.sampling_weights(records, 0.0).tolist() == [1.0] * 15
    weights = script.sampling_weights(records, 1.0)
    assert float(weights[:8].sum()) == pytest.approx(float(weights[8:10].sum()))  # classes balanced
    assert float(weights[:10].sum()) == pytest.approx(10) and float(weights[10:].sum()) == pytest.approx(5)


def test_prompt_loss_is_the_cross_entropy_of_zero_shot_scoring() -> None:
    """The training loss on the prompt ensembles scores exactly as `zero_shot_probabilities` does."""
    import torch

    from medfm.clip.data import TASKS
    from medfm.clip.model import small_model
    from medfm.clip.zeroshot import zero_shot_probabilities

    script = _training_script()
    torch.manual_seed(0)
    model = small_model(script.prompt_templates("v2")).eval()
    tasks = [("isic2017_skin", "dermoscopy"), ("covid_cxr_notes", "X-ray")]
    prompts = {key: [[t.format(label) for t in model.templates(key[1])] for label in TASKS[key[0]].labels] for key in tasks}
    strings = sorted({t for rows in prompts.values() for row in rows for t in row})
    row = {text: i for i, text in enumerate(strings)}
    with torch.inference_mode():
        text_cache = model.text_features(strings)
        images = model.embed_image_features(torch.randn(6, 256, 8, 8))
    prompt_rows = {key: torch.tensor([[row[t] for t in texts] for texts in rows]) for key, rows in prompts.items()}
    task_of, class_of = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 1, 1, 0, 1, 0])
    with torch.no_grad():
        loss = script.prompt_loss(model, images, text_cache, prompt_rows, tasks, task_of, class_of)
    isic = zero_shot_probabilities(model, images[:3], TASKS["isic2017_skin"].labels, model.templates("dermoscopy"))
    covid = zero_shot_probabilities(model, images[3:], ["COVID-19"], model.templates("X-ray"), "pos-neg")[:, 0]
    covid = torch.stack([covid, 1 - covid], dim=1)
    chosen = torch.cat([isic[torch.arange(3), class_of[:3]], covid[torch.arange(3), class_of[3:]]])
    assert float(loss) == pytest.approx(float(-chosen.log().mean()), rel=1e-4)
