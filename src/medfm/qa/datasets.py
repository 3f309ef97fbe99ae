"""Medical exam question sets in the layouts users have, read into one `QAItem` form.

* medfm's shared layout: ``<dataset>/items.jsonl`` (``id, question, options{A..}, answer``, PubMedQA
  with ``context`` and a yes/no/maybe ``answer``; see ``../shared/data/text/manifest.json``);
* MedQA's original jsonl (``question, options{A..}, answer_idx``);
* PubMedQA's ``ori_pqal.json`` (``{pmid: {QUESTION, CONTEXTS, final_decision}}``);
* MedMCQA's ``dev.json`` (jsonl: ``question, opa..opd, cop`` with ``cop`` 1-4, as released);
* MMLU's csv files (no header: question, A, B, C, D, answer letter), one file per subject.

A bad item (no answer, an answer that is not an option, an option set of one) becomes an
`ItemProblem` naming its file and line; the other items go on. A folder of no known layout is an
`InputFileError` before any model is loaded.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfm.errors import InputFileError

PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
EXEMPLAR_POOL = 20  # items per dataset kept out of scoring, from which few-shot exemplars are drawn


@dataclass(frozen=True)
class QAItem:
    """One closed question: its ``options`` (key -> text, e.g. ``A`` -> ``"Aspirin"``), the key of
    the ``answer``, an optional ``context`` (PubMedQA's abstract) and where it came from."""

    id: str
    dataset: str
    question: str
    options: dict[str, str]
    answer: str
    context: str | None = None
    source: str = ""
    split: str | None = None


@dataclass(frozen=True)
class ItemProblem:
    """An item that cannot be scored, and why (``file:line: problem``)."""

    dataset: str
    id: str
    message: str


@dataclass
class QADataset:
    """The items of one data folder: ``exemplars`` (a separate split, never scored) and ``items``."""

    name: str
    folder: Path
    layout: str
    items: list[QAItem] = field(default_factory=list)
    exemplars: list[QAItem] = field(default_factory=list)
    problems: list[ItemProblem] = field(default_factory=list)


def read_dataset(folder: str | Path) -> QADataset:
    """Read a data folder of any known layout and set its exemplar split aside.

    Exemplars are MMLU's official ``dev`` items where there are any, else the `EXEMPLAR_POOL` items
    whose SHA-256 of ``"medfm-qa-exemplar:" + id`` sorts first; they are never scored, under any
    strategy, so that accuracies of zero-shot and few-shot runs cover the same items."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(folder, "is not a folder of questions")
    layout, records = _detect(folder)
    dataset = QADataset(folder.name, folder, layout)
    items: list[QAItem] = []
    for path, line, record in records:
        try:
            items.append(_parse(layout, record, folder.name, f"{path.name}:{line}", path.stem))
        except ValueError as problem:
            dataset.problems.append(ItemProblem(folder.name, str(record.get("id", f"line {line}")) if isinstance(record, dict)
                                                else f"line {line}", f"{path}:{line}: {problem}"))
    if not items and not dataset.problems:
        raise InputFileError(folder, f"holds no questions ({layout} layout)")
    dev = [item for item in items if item.split == "dev"]
    if dev:
        dataset.exemplars = dev
    else:
        ranked = sorted(items, key=lambda item: hashlib.sha256(f"medfm-qa-exemplar:{item.id}".encode()).hexdigest())
        dataset.exemplars = ranked[: min(EXEMPLAR_POOL, len(items) // 5)]
    held = {item.id for item in dataset.exemplars}
    dataset.items = [item for item in items if item.id not in held]
    return dataset


def _detect(folder: Path) -> tuple[str, Iterator[tuple[Path, int, Any]]]:
    """The folder's layout and its records as (file, 1-based line, record)."""
    if (folder / "items.jsonl").is_file():
        return "medfm-jsonl", _jsonl(folder / "items.jsonl")
    if (folder / "ori_pqal.json").is_file():
        return "pubmedqa-ori-pqal", _pqal(folder / "ori_pqal.json")
    if (folder / "dev.json").is_file():
        return "medmcqa", _jsonl(folder / "dev.json")
    csvs = sorted(folder.glob("*.csv"))
    if csvs:
        return "mmlu-csv", (record for path in csvs for record in _csv(path))
    jsonls = sorted(folder.glob("*.jsonl"))
    if jsonls:
        return "medqa-jsonl", (record for path in jsonls for record in _jsonl(path))
    raise InputFileError(folder, "unknown question layout: expected items.jsonl (medfm), MedQA *.jsonl, "
                                 "PubMedQA ori_pqal.json, MedMCQA dev.json or MMLU *.csv")


def _jsonl(path: Path) -> Iterator[tuple[Path, int, Any]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield path, number, json.loads(line)
                except json.JSONDecodeError as error:
                    yield path, number, {"_invalid": f"not valid JSON ({error.msg})"}


def _pqal(path: Path) -> Iterator[tuple[Path, int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputFileError(path, f"not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise InputFileError(path, "expected PubMedQA's {pmid: {QUESTION, CONTEXTS, final_decision}} object")
    for number, (pmid, record) in enumerate(data.items(), 1):
        yield path, number, {**record, "id": pmid} if isinstance(record, dict) else {"_invalid": "not an object"}


def _csv(path: Path) -> Iterator[tuple[Path, int, Any]]:
    with open(path, encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.reader(handle), 1):
            yield path, number, {"row": row}


def _parse(layout: str, record: Any, dataset: str, where: str, stem: str) -> QAItem:
    """One record as a `QAItem`, or ValueError saying what is wrong with it."""
    if not isinstance(record, dict) or "_invalid" in record:
        raise ValueError(record.get("_invalid", "not a JSON object") if isinstance(record, dict) else "not a JSON object")
    context = None
    split = record.get("split")
    if layout == "pubmedqa-ori-pqal":
        question, options, answer = record.get("QUESTION"), PUBMEDQA_OPTIONS, record.get("final_decision")
        context = "\n".join(record.get("CONTEXTS") or []) or None
        answer = _key_of(options, answer)
        identifier = str(record["id"])
    elif layout == "medmcqa":
        question = record.get("question")
        options = {letter: record.get(f"op{letter.lower()}") for letter in "ABCD"}
        cop = record.get("cop")
        answer = "ABCD"[cop - 1] if isinstance(cop, int) and 1 <= cop <= 4 else None
        identifier = str(record.get("id") or where)
    elif layout == "mmlu-csv":
        row = record["row"]
        if len(row) < 4:
            raise ValueError(f"expected question, options and an answer letter, got {len(row)} column(s)")
        question, options, answer = row[0], dict(zip("ABCDEFGH", row[1:-1])), row[-1].strip()
        identifier, split = f"{stem}_{where.rsplit(':', 1)[1]}", "dev" if stem.endswith("_dev") else None
    else:  # medfm-jsonl and MedQA's original jsonl
        question, context = record.get("question"), record.get("context")
        yes_no_maybe = "context" in record or record.get("answer") in PUBMEDQA_OPTIONS.values()
        options = record.get("options") or (PUBMEDQA_OPTIONS if yes_no_maybe else {})
        answer = record.get("answer_idx") or record.get("answer")
        if options is PUBMEDQA_OPTIONS:
            answer = _key_of(options, answer)
        elif isinstance(answer, str) and answer not in options:
            answer = _key_of(options, answer) or answer  # MedQA's "answer" holds the text when answer_idx is absent
        identifier = str(record.get("id") or where)
    if not isinstance(question, str) or not question.strip():
        raise ValueError("no question text")
    if not isinstance(options, dict) or not all(isinstance(text, str) and text.strip() for text in options.values()):
        raise ValueError("options must be a mapping of keys to non-empty texts")
    if len(options) < 2:
        raise ValueError(f"an option set of {len(options)}: a closed question needs at least two options")
    if not answer:
        raise ValueError("no answer")
    if answer not in options:
        raise ValueError(f"answer {answer!r} is not one of the options {', '.join(options)}")
    return QAItem(identifier, dataset, question.strip(), dict(options), answer, context, where, split)


def _key_of(options: dict[str, str], text: Any) -> str | None:
    """The key of the option whose text is ``text`` (case-insensitive), or None."""
    for key, option in options.items():
        if isinstance(text, str) and option.strip().lower() == text.strip().lower():
            return key
    return None
