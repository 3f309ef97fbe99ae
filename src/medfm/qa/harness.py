"""``medfm qa`` underneath: score a language model on medical exam questions and write ``items.csv``,
``summary.json`` and ``report.html``.

Resumable: ``run.json`` records the settings; a rerun into the same ``out`` skips the items already
in ``items.csv`` (each scored item is appended as one line in one write; a torn last line from an
interrupted run is dropped) and refuses other settings, which would mix two experiments.
Deterministic given the seed: scoring and greedy decoding are, and sampled paths use per-item seeds.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medfm.errors import OptionError
from medfm.io.writers import atomic_path
from medfm.lm import ContinuationScore, LanguageModel
from medfm.lm import load as load_lm
from medfm.qa.datasets import ItemProblem, QADataset, QAItem, read_dataset
from medfm.qa.strategies import (
    DEFAULT_NORMALISATION,
    NORMALISATIONS,
    answer,
    exemplars_for,
    normalised,
    parse_strategy,
)

COLUMNS = ("dataset", "id", "source", "prediction", "answer", "correct", "method", "scores", "generations")
Z_95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(
    model: str | os.PathLike[str] | LanguageModel,
    data: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    strategy: str = "zero-shot",
    limit: int | None = None,
    seed: int = 0,
    normalisation: str = DEFAULT_NORMALISATION,
    max_new_tokens: int = 192,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``model`` (a `LanguageModel` or what `medfm.lm.load` takes) on each data folder's first
    ``limit`` items with ``strategy``; write the outputs into ``out`` and return the summary."""
    parsed = parse_strategy(strategy)
    if normalisation not in NORMALISATIONS:
        raise OptionError(f"unknown normalisation '{normalisation}' (one of: {', '.join(NORMALISATIONS)})")
    if limit is not None and limit < 1:
        raise OptionError(f"--limit must be at least 1, got {limit}")
    datasets = [read_dataset(folder) for folder in data]  # bad folders fail here, before the model loads
    names = [dataset.name for dataset in datasets]
    if len(set(names)) != len(names):
        raise OptionError(f"two data folders share a name ({', '.join(names)}): items.csv keys rows by folder name")
    out = Path(out)
    model_name = model.name if isinstance(model, LanguageModel) else str(model)
    settings = {"model": model_name, "strategy": str(parsed), "seed": seed, "normalisation": normalisation,
                "max_new_tokens": max_new_tokens}
    done = _start_run(out, settings)
    lm = model if isinstance(model, LanguageModel) else load_lm(model)
    problems: list[ItemProblem] = [problem for dataset in datasets for problem in dataset.problems]
    for problem in problems:
        print(f"medfm qa: skipped {problem.message}", file=sys.stderr)
    started, scored = time.perf_counter(), 0
    for dataset in datasets:
        items = dataset.items[:limit]
        exemplars = exemplars_for(dataset.exemplars, parsed.count, seed, dataset.name) if parsed.name == "few-shot" else []
        todo = [item for item in items if (dataset.name, item.id) not in done]
        for index, item in enumerate(todo, 1):
            try:
                result = answer(lm, item, parsed, exemplars=exemplars, normalisation=normalisation, seed=seed,
                                max_new_tokens=max_new_tokens)
            except ValueError as error:  # PromptError (over the context length) and the like
                problem = ItemProblem(dataset.name, item.id, f"{dataset.folder / item.source}: {error}")
                problems.append(problem)
                print(f"medfm qa: skipped {problem.message}", file=sys.stderr)
                continue
            _append_row(out / "items.csv", _row(item, result))
            scored += 1
            if progress:
                rate = scored / (time.perf_counter() - started)
                print(f"medfm qa: {dataset.name} {len(items) - len(todo) + index}/{len(items)} ({rate:.2f} items/s)",
                      file=sys.stderr)
    seconds = time.perf_counter() - started
    summary = summarize(_read_rows(out / "items.csv"), datasets, limit)
    summary.update(settings=settings, problems=[problem.message for problem in problems], scored_this_run=scored,
                   seconds_this_run=round(seconds, 2), items_per_second=round(scored / seconds, 3) if scored else None)
    with atomic_path(out / "summary.json") as temporary:
        temporary.write_text(json.dumps(summary, indent=2) + "\n")
    with atomic_path(out / "report.html") as temporary:
        temporary.write_text(render_report(summary))
    return summary


def _start_run(out: Path, settings: dict[str, Any]) -> set[tuple[str, str]]:
    """Create or resume ``out``; returns the (dataset, id) pairs already scored."""
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous != settings:
            differing = ", ".join(f"{key} {previous.get(key)!r} -> {value!r}" for key, value in settings.items()
                                  if previous.get(key) != value)
            raise OptionError(f"{out}: holds a run with other settings ({differing}); resume with the same settings "
                              "or pass another --out")
    else:
        with atomic_path(run_file) as temporary:
            temporary.write_text(json.dumps(settings, indent=2) + "\n")
    items_file = out / "items.csv"
    if not items_file.is_file():
        with atomic_path(items_file) as temporary:
            temporary.write_text(",".join(COLUMNS) + "\n")
        return set()
    text = items_file.read_text(encoding="utf-8")
    if not text.endswith("\n"):  # an interrupted append: drop the torn row
        with atomic_path(items_file) as temporary:
            temporary.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    return {(row["dataset"], row["id"]) for row in _read_rows(items_file)}


def _row(item: QAItem, result: Any) -> dict[str, Any]:
    return {
        "dataset": item.dataset, "id": item.id, "source": item.source, "prediction": result.prediction or "",
        "answer": item.answer, "correct": int(result.prediction == item.answer), "method": result.method,
        "scores": json.dumps({key: [round(score.logprob, 5), score.tokens, score.chars] for key, score in result.scores.items()}),
        "generations": json.dumps(result.generations) if result.generations else "",
    }


def _append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one CSV row with a single write, so an interruption leaves at most a torn last line."""
    buffer = io.StringIO()
    csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n").writerow(row)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(descriptor, buffer.getvalue().encode("utf-8"))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def summarize(rows: Sequence[dict[str, str]], datasets: Sequence[QADataset], limit: int | None) -> dict[str, Any]:
    """Accuracy per dataset with its Wilson 95% interval, n, and the majority-class and chance rates
    of the same items; with option scores, the accuracy under each length normalisation too."""
    by_dataset: dict[str, Any] = {}
    for dataset in datasets:
        wanted = {item.id: item for item in dataset.items[:limit]}
        chosen = [row for row in rows if row["dataset"] == dataset.name and row["id"] in wanted]
        n, correct = len(chosen), sum(int(row["correct"]) for row in chosen)
        answers = Counter(row["answer"] for row in chosen)
        low, high = wilson_interval(correct, n)
        entry = {
            "n": n, "correct": correct, "accuracy": correct / n if n else None, "ci95": [low, high],
            "majority_class_rate": max(answers.values()) / n if n else None,
            "chance_rate": sum(1 / len(wanted[row["id"]].options) for row in chosen) / n if n else None,
            "layout": dataset.layout, "folder": str(dataset.folder),
        }
        scored = [(row, json.loads(row["scores"])) for row in chosen if row["scores"] not in ("", "{}")]
        if scored and len(scored) == n:
            entry["accuracy_by_normalisation"] = {
                name: sum(max(scores, key=lambda key: normalised(ContinuationScore(*scores[key]), name)) == row["answer"]
                          for row, scores in scored) / n
                for name in NORMALISATIONS
            }
        by_dataset[dataset.name] = entry
    return {"datasets": by_dataset}


def render_report(summary: dict[str, Any]) -> str:
    """A self-contained HTML page: the table and a bar plot of accuracy with its interval, against
    the majority-class and chance rates."""
    import html

    from medfm.evaluate.report import _img, _table

    settings = summary["settings"]
    problems = "".join(f"<li>{html.escape(problem)}</li>" for problem in summary["problems"])
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>medfm qa</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1000px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}th{background:#f3f3f3}</style></head><body>"
        f"<h1>medfm qa: {html.escape(settings['model'])}</h1><p>strategy <b>{html.escape(settings['strategy'])}</b>, "
        f"option scores normalised per {html.escape(settings['normalisation'])}, seed {settings['seed']}.</p>"
        + _table(SUMMARY_HEADER, summary_table(summary))
        + _img(_accuracy_plot(summary))
        + (f"<h2>Skipped items</h2><ul>{problems}</ul>" if problems else "") + "</body></html>\n"
    )


def _accuracy_plot(summary: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medfm.evaluate.report import _figure_png

    names = [name for name, d in summary["datasets"].items() if d["n"]]
    stats = [summary["datasets"][name] for name in names]
    figure, axes = plt.subplots(figsize=(1.6 * len(names) + 2, 3.5))
    positions = range(len(names))
    accuracy = [d["accuracy"] for d in stats]
    errors = [[max(a - d["ci95"][0], 0) for a, d in zip(accuracy, stats)], [max(d["ci95"][1] - a, 0) for a, d in zip(accuracy, stats)]]
    axes.bar(positions, accuracy, yerr=errors, capsize=4, color="#4c72b0", label="accuracy (95% interval)")
    axes.scatter(positions, [d["majority_class_rate"] for d in stats], marker="_", s=900, color="#c44e52", label="majority class")
    axes.scatter(positions, [d["chance_rate"] for d in stats], marker="_", s=900, color="#777777", label="chance")
    axes.set_xticks(list(positions), names, rotation=15)
    axes.set_ylim(0, 1)
    axes.set_ylabel("accuracy")
    axes.legend(fontsize=8, loc="upper right")
    return _figure_png(figure)


SUMMARY_HEADER = ["dataset", "accuracy [95% interval, Wilson]", "n", "majority class", "chance"]


def summary_table(summary: dict[str, Any]) -> list[list[str]]:
    """Rows for a terminal table: dataset, accuracy [95% interval], n, majority class, chance."""
    return [[name, f"{d['accuracy']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]" if d["n"] else "-", str(d["n"]),
             f"{d['majority_class_rate']:.3f}" if d["n"] else "-", f"{d['chance_rate']:.3f}" if d["n"] else "-"]
            for name, d in summary["datasets"].items()]

