"""The data of ``medfm train-lm``: medical text for continued training and question-answer pairs for
instruction tuning, read from the QA harness's layouts and from report files, with a deterministic
train/validation split.

* a folder with ``reports.jsonl`` (medfm's IU X-ray layout: ``id, indication, findings, impression``):
  report text, for ``continue`` only;
* a folder of questions in any layout `medfm.qa.read_dataset` reads (medfm ``items.jsonl``, MedQA
  jsonl, PubMedQA ``ori_pqal.json``, MedMCQA ``dev.json``, MMLU csv). ``continue`` trains on their
  text (PubMedQA's abstract; else the question and its correct answer), ``instruct`` on the
  question -> answer pairs, the question rendered as the harness renders it.

Split: an item is validation when ``sha256("medfm-lm-split-v1:" + key)`` falls in the first
``val_fraction`` of the hash range. The key is the report (= patient) id for reports, PubMedQA's
PMID, and the question's content (question and options) for the multiple-choice sets, so MMLU's
verbatim duplicates across subjects never straddle the split. The harness's few-shot exemplars
(MMLU's dev items, else its exemplar pool) are in neither part.

Held out entirely: the harness's headline set, MedQA's USMLE test questions; a MedQA test folder
is refused. Its scores on a model tuned here therefore stay clean; on the other sets only the
validation part is clean (the training part was trained on).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from medfm.errors import InputFileError, OptionError
from medfm.qa.datasets import QAItem, read_dataset

RECIPES = ("continue", "instruct")
SPLIT_SALT = "medfm-lm-split-v1:"
REPORTS_FILE = "reports.jsonl"
REPORT_SECTIONS = ("indication", "comparison", "findings", "impression")


@dataclass(frozen=True)
class TextDocument:
    """One text of the continued-training corpus."""

    id: str
    dataset: str
    text: str


@dataclass
class LMSource:
    """One ``--data`` folder, split: training and validation documents (continue) or items (instruct)."""

    name: str
    folder: Path
    layout: str
    train_docs: list[TextDocument] = field(default_factory=list)
    val_docs: list[TextDocument] = field(default_factory=list)
    train_items: list[QAItem] = field(default_factory=list)
    val_items: list[QAItem] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def is_validation(key: str, fraction: float) -> bool:
    """Whether ``key`` falls in the validation part (the first ``fraction`` of its SHA-256 range)."""
    return int(hashlib.sha256((SPLIT_SALT + key).encode()).hexdigest()[:12], 16) < fraction * 16**12


def item_key(item: QAItem) -> str:
    """The split key of a question: PubMedQA's PMID (items with an abstract), else its content."""
    if item.context:
        return f"{item.dataset}:{item.id}"
    return json.dumps([item.question, item.options], sort_keys=True)


def is_headline(folder: Path, layout: str) -> bool:
    """Whether ``folder`` holds MedQA's test questions, the set the harness reports first."""
    name = folder.name.lower()
    return "medqa" in name and "test" in name or (layout == "medqa-jsonl" and any("test" in path.name.lower()
                                                                                   for path in folder.glob("*.jsonl")))


def read_sources(folders: list[Path], recipe: str, val_fraction: float) -> list[LMSource]:
    """Every ``--data`` folder, read and split; one-line errors (naming the folder) for an unknown
    recipe or layout, an empty folder, a folder the recipe cannot use or the held-out headline set."""
    if recipe not in RECIPES:
        raise OptionError(f"unknown recipe '{recipe}' (one of: {', '.join(RECIPES)})")
    if not 0.0 < val_fraction < 1.0:
        raise OptionError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}")
    if not folders:
        raise OptionError("give at least one --data folder")
    sources = [_read_one(Path(folder), recipe, val_fraction) for folder in folders]
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise OptionError(f"two --data folders share a name ({', '.join(names)})")
    return sources


def _read_one(folder: Path, recipe: str, val_fraction: float) -> LMSource:
    if not folder.is_dir():
        raise InputFileError(folder, "is not a folder (--data takes a folder of reports or questions)")
    if (folder / REPORTS_FILE).is_file():
        if recipe == "instruct":
            raise InputFileError(folder, "holds report text, no question-answer pairs: use it with --recipe continue")
        source = LMSource(folder.name, folder, "reports")
        for document in _read_reports(folder / REPORTS_FILE, folder.name, source.problems):
            (source.val_docs if is_validation(document.id, val_fraction) else source.train_docs).append(document)
        if not source.train_docs:
            raise InputFileError(folder / REPORTS_FILE, "holds no report text for training")
        return source
    dataset = read_dataset(folder)  # InputFileError for a folder of no known layout
    if is_headline(folder, dataset.layout):
        raise InputFileError(folder, "is MedQA's test set, the QA harness's headline: medfm train-lm never trains "
                                     "on it (score it with medfm qa)")
    source = LMSource(folder.name, folder, dataset.layout, problems=[problem.message for problem in dataset.problems])
    for item in dataset.items:  # exemplars excluded: the harness's few-shot prompts use them
        (source.val_items if is_validation(item_key(item), val_fraction) else source.train_items).append(item)
    if not source.train_items:
        raise InputFileError(folder, f"holds no question for training ({len(dataset.problems)} unusable)")
    if recipe == "continue":
        source.train_docs = [_item_text(item) for item in source.train_items]
        source.val_docs = [_item_text(item) for item in source.val_items]
    return source


def _read_reports(path: Path, dataset: str, problems: list[str]) -> list[TextDocument]:
    """The reports of a ``reports.jsonl``: their sections as one text; bad lines are noted and skipped."""
    documents = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"{path}:{number}: not valid JSON ({error.msg})")
                continue
            if not isinstance(record, dict) or not record.get("id"):
                problems.append(f"{path}:{number}: a report needs an id")
                continue
            parts = [f"{section.capitalize()}: {record[section].strip()}" for section in REPORT_SECTIONS
                     if isinstance(record.get(section), str) and record[section].strip()]
            if not any(section in ("findings", "impression") and isinstance(record.get(section), str)
                       and record[section].strip() for section in REPORT_SECTIONS):
                problems.append(f"{path}:{number}: report {record['id']} has neither findings nor impression")
                continue
            documents.append(TextDocument(str(record["id"]), dataset, "\n".join(parts)))
    return documents


def _item_text(item: QAItem) -> TextDocument:
    """A question as running text: PubMedQA's abstract, else the question and its correct answer."""
    text = item.context if item.context else f"{item.question}\n{item.options[item.answer]}"
    return TextDocument(item.id, item.dataset, text)
