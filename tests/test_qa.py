"""medfm.qa: the readers of each public layout, the Wilson interval, the harness on tiny random
checkpoints in every published LM layout (outputs, resume, determinism, few-shot exemplars kept
apart, reasoning strategies, bad items that do not stop the others) and the ``medfm qa`` command."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

import medfm.lm
import medfm.qa
from medfm.errors import InputFileError, OptionError
from medfm.qa.datasets import EXEMPLAR_POOL
from medfm.qa.strategies import _ANSWER, normalised, parse_strategy
from tests.tiny_lm import LAYOUTS, write_tiny_lm

REGISTRY_NAME = {"llama": "pmc-llama", "bloom": "clinicalgpt", "gpt2": "biomedlm", "biogpt": "biogpt"}
WORDS = "fever cough chest pain dyspnea scurvy vitamin radiograph heart lungs clear normal".split()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, medfm.lm.LanguageModel]:
    root = tmp_path_factory.mktemp("qa_lms")
    return {layout: medfm.lm.load(REGISTRY_NAME[layout], weights=write_tiny_lm(layout, root / layout))
            for layout in LAYOUTS}


def write_items(folder: Path, count: int, *, extra: list[dict] | None = None) -> Path:
    """A medfm-layout MCQ set of ``count`` 4-option items (answers cycling A-D), plus ``extra`` lines."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        options = {letter: f"{WORDS[(index + offset) % len(WORDS)]} {letter.lower()}" for offset, letter in enumerate("ABCD")}
        lines.append({"id": f"q{index:03d}", "question": f"Which finding fits case {index}?", "options": options,
                      "answer": "ABCD"[index % 4]})
    lines += extra or []
    (folder / "items.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_public_layouts_are_read(tmp_path):
    medqa = tmp_path / "medqa"
    medqa.mkdir()
    (medqa / "test.jsonl").write_text(json.dumps({"question": "Q1?", "answer": "Aspirin", "options": {"A": "Aspirin", "B": "Heparin"},
                                                  "meta_info": "step1", "answer_idx": "A"}) + "\n")
    pubmedqa = tmp_path / "pubmedqa"
    pubmedqa.mkdir()
    (pubmedqa / "ori_pqal.json").write_text(json.dumps({"123": {"QUESTION": "Does X help?", "CONTEXTS": ["a", "b"],
                                                                "final_decision": "maybe"}}))
    medmcqa = tmp_path / "medmcqa"
    medmcqa.mkdir()
    (medmcqa / "dev.json").write_text(json.dumps({"id": "u1", "question": "Q?", "opa": "w", "opb": "x", "opc": "y",
                                                  "opd": "z", "cop": 3}) + "\n")
    mmlu = tmp_path / "mmlu"
    mmlu.mkdir()
    (mmlu / "anatomy_test.csv").write_text('"Which bone?",hyoid,femur,tibia,ulna,B\n')
    (mmlu / "anatomy_dev.csv").write_text("Which organ?,heart,liver,lung,skin,C\n")
    assert [(i.answer, i.options["A"]) for i in medfm.qa.read_dataset(medqa).items] == [("A", "Aspirin")]
    [item] = medfm.qa.read_dataset(pubmedqa).items
    assert item.id == "123" and item.answer == "C" and item.options == {"A": "yes", "B": "no", "C": "maybe"} and item.context == "a\nb"
    assert medfm.qa.read_dataset(medmcqa).items[0].answer == "C"
    read = medfm.qa.read_dataset(mmlu)
    assert read.layout == "mmlu-csv" and [i.answer for i in read.items] == ["B"] and [i.answer for i in read.exemplars] == ["C"]


def test_shared_text_layout_is_read_with_its_exemplar_split():
    from tests.conftest import shared_folder

    dataset = medfm.qa.read_dataset(shared_folder("text") / "pubmedqa_labeled")
    assert dataset.layout == "medfm-jsonl" and len(dataset.items) + len(dataset.exemplars) == 700
    assert len(dataset.exemplars) == EXEMPLAR_POOL and not dataset.problems
    assert {item.answer for item in dataset.items} == {"A", "B", "C"} and dataset.items[0].context


def test_bad_items_are_named_by_file_and_line_and_the_rest_go_on(tmp_path):
    folder = write_items(tmp_path / "set", 10, extra=[
        {"id": "no-answer", "question": "Q?", "options": {"A": "x", "B": "y"}},
        {"id": "one-option", "question": "Q?", "options": {"A": "x"}, "answer": "A"},
        {"id": "bad-key", "question": "Q?", "options": {"A": "x", "B": "y"}, "answer": "E"},
    ])
    with open(folder / "items.jsonl", "a") as handle:
        handle.write("{not json\n")
    dataset = medfm.qa.read_dataset(folder)
    assert len(dataset.items) + len(dataset.exemplars) == 10
    messages = [problem.message for problem in dataset.problems]
    assert messages[0].endswith("items.jsonl:11: no answer") and str(folder) in messages[0]
    assert "items.jsonl:12: an option set of 1" in messages[1] and "items.jsonl:13: answer 'E'" in messages[2]
    assert "items.jsonl:14: not valid JSON" in messages[3]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="unknown question layout"):
        medfm.qa.read_dataset(tmp_path / "empty")


def test_wilson_interval():
    assert medfm.qa.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert medfm.qa.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert medfm.qa.wilson_interval(0, 0) == (0.0, 1.0)


def test_strategies_parse_and_answers_are_extracted():
    assert str(parse_strategy("few-shot:3")) == "few-shot:3" and parse_strategy("cot").generates
    for bad in ("few-shot", "cot:2", "self-consistency:0", "beam"):
        with pytest.raises(OptionError, match="unknown strategy"):
            parse_strategy(bad)
    assert _ANSWER.findall("A is tempting, but the answer is (C). Final: the answer is **D**") == ["C", "D"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_harness_writes_its_outputs_on_every_layout(tiny_models, tmp_path, layout):
    lm = tiny_models[layout]
    data = write_items(tmp_path / "mcq", 26)
    summary = medfm.qa.evaluate(lm, [data], tmp_path / "out", limit=6, progress=False)
    entry = summary["datasets"]["mcq"]
    assert entry["n"] == 6 and entry["chance_rate"] == 0.25 and 0 < entry["majority_class_rate"] <= 1
    assert entry["ci95"] == list(medfm.qa.wilson_interval(entry["correct"], 6))
    rows = list(csv.DictReader(open(tmp_path / "out" / "items.csv")))
    items = {item.id: item for item in medfm.qa.read_dataset(data).items}
    for row in rows:  # the prediction is the option with the best per-character log-likelihood
        scores = json.loads(row["scores"])
        expected = medfm.lm.ContinuationScore(*scores[row["prediction"]])
        assert all(normalised(expected, "char") >= normalised(medfm.lm.ContinuationScore(*s), "char") for s in scores.values())
        assert row["correct"] == str(int(row["prediction"] == items[row["id"]].answer))
    assert set(entry["accuracy_by_normalisation"]) == {"char", "token", "sum"}
    assert "<img" in (tmp_path / "out" / "report.html").read_text()


def test_resume_skips_scored_items_and_drops_a_torn_row(tiny_models, tmp_path):
    lm = tiny_models["gpt2"]
    data = write_items(tmp_path / "mcq", 30)
    full = medfm.qa.evaluate(lm, [data], tmp_path / "full", limit=8, progress=False)
    first = medfm.qa.evaluate(lm, [data], tmp_path / "part", limit=5, progress=False)
    assert first["scored_this_run"] == 5
    items = tmp_path / "part" / "items.csv"
    items.write_text(items.read_text()[:-7])  # an append interrupted mid-row
    resumed = medfm.qa.evaluate(lm, [data], tmp_path / "part", limit=8, progress=False)
    assert resumed["scored_this_run"] == 4 and resumed["datasets"] == full["datasets"]
    assert items.read_text() == (tmp_path / "full" / "items.csv").read_text()  # deterministic, no duplicates
    with pytest.raises(OptionError, match="other settings .*strategy 'zero-shot' -> 'few-shot:2'"):
        medfm.qa.evaluate(lm, [data], tmp_path / "part", strategy="few-shot:2", limit=8, progress=False)


def test_few_shot_exemplars_come_from_the_separate_split(tiny_models, tmp_path, monkeypatch):
    lm = tiny_models["llama"]
    data = write_items(tmp_path / "mcq", 40)
    prompts: list[str] = []
    score_details = lm.score_details
    monkeypatch.setattr(lm, "score_details", lambda prefix, options: prompts.append(prefix) or score_details(prefix, options))
    medfm.qa.evaluate(lm, [data], tmp_path / "out", strategy="few-shot:3", limit=4, progress=False)
    dataset = medfm.qa.read_dataset(data)
    exemplar_ids = {item.id for item in dataset.exemplars}
    scored_ids = {row["id"] for row in csv.DictReader(open(tmp_path / "out" / "items.csv"))}
    assert not exemplar_ids & scored_ids and len(prompts) == 4
    shown = [item for item in dataset.exemplars if item.question in prompts[0]]
    assert len(shown) == 3 and all(f"### Response:\n{item.options[item.answer]}" in prompts[0] for item in shown)


@pytest.mark.parametrize("strategy", ["cot", "self-consistency:2", "ensemble-refinement:2"])
def test_reasoning_strategies_generate_and_are_deterministic(tiny_models, tmp_path, strategy):
    lm = tiny_models["llama"]
    data = write_items(tmp_path / "mcq", 10)
    runs = [medfm.qa.evaluate(lm, [data], tmp_path / f"out{run}", strategy=strategy, limit=2, max_new_tokens=6,
                              progress=False) for run in range(2)]
    rows = [list(csv.DictReader(open(tmp_path / f"out{run}" / "items.csv"))) for run in range(2)]
    assert rows[0] == rows[1] and runs[0]["datasets"]["mcq"]["n"] == 2
    paths = {"cot": 1, "self-consistency:2": 2, "ensemble-refinement:2": 3}[strategy]
    assert all(len(json.loads(row["generations"])) == paths and row["prediction"] in "ABCD" for row in rows[0])


def test_an_item_over_the_context_is_reported_and_the_others_go_on(tiny_models, tmp_path):
    long = {"id": "long", "question": "cough " * 600, "options": {"A": "x", "B": "y"}, "answer": "A"}
    data = write_items(tmp_path / "mcq", 5, extra=[long])
    summary = medfm.qa.evaluate(tiny_models["gpt2"], [data], tmp_path / "out", progress=False)
    [problem] = summary["problems"]
    assert problem.startswith(f"{data / 'items.jsonl'}:6: ") and "context length of 512" in problem
    assert summary["datasets"]["mcq"]["n"] == 4  # 6 items, 1 exemplar set aside, 1 too long


def test_cli_runs_and_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    from medfm.cli import main

    folder = write_tiny_lm("gpt2", tmp_path / "lm")
    data = write_items(tmp_path / "mcq", 8)
    monkeypatch.setenv("MEDFM_OFFLINE", "1")
    command = ["medfm", "qa", "--model", str(folder)]
    monkeypatch.setattr(sys, "argv", [*command, "--data", str(data), "--limit", "3", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None)
    assert "mcq" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["datasets"]["mcq"]["n"] == 3
    (tmp_path / "nothing").mkdir()
    monkeypatch.setattr(sys, "argv", [*command, "--data", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit) as failed:
        main()
    error = capsys.readouterr().err
    assert failed.value.code == 2 and "unknown question layout" in error and "Traceback" not in error
