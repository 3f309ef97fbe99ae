"""The adaptation benchmark: the survey's recipes side by side on one base, one data split, one budget.

Each recipe is trained by ``medfm train`` in its own process (so its peak memory is its own), on the
training part of a patient-wise split of ``--data``; then the base model (zero-shot) and every run's
best checkpoint are evaluated on the held-out part with ``medfm.evaluate`` at the input resolution
(a tight box per target, Dice), and one table prints: recipe x dataset Dice, trainable parameters,
training time and peak memory. The same script trains medfm's own fine-tuned default
(``--recipes decoder`` over all of ``../shared/data/seg``; see MODEL_CARD.md of medfm-litemedsam-ft).
``--blend 0.5`` also scores each full/decoder run moved halfway back to its base in weight space
(WiSE-FT, `medfm.train.recipes.blend_with_base`), as the row ``<recipe>@0.5``.

    python benchmarks/adaptation.py --data ../shared/data/seg --out out/adaptation \\
        --dataset covid19_ct_lung_infection --dataset busi_breast_ultrasound --limit 40 --budget-minutes 4

Runs already finished in ``--out`` are not trained again (delete them to retrain).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from medfm.data.datasets import discover_cases, split_cases
from medfm.evaluate.runner import evaluate, rows_as_dicts, summarize
from medfm.segment.model import load
from medfm.train import RECIPES
from medfm.train.recipes import BLENDABLE, blend_with_base


def train_recipe(recipe: str, args: argparse.Namespace) -> Path:
    """Train one recipe with ``medfm train`` (resuming an interrupted run) and return its run folder."""
    run = args.out / recipe
    if (run / "metrics.json").is_file() and json.loads((run / "metrics.json").read_text()).get("finished"):
        return run
    command = [sys.executable, "-m", "medfm", "train", "--recipe", recipe, "--base", args.base, "--data", str(args.data),
               "--val-fraction", str(args.val_fraction), "--min-val-cases", str(args.min_val_cases), "--seed", str(args.seed), "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--lr", str(args.lr), "-o", str(run)]
    command += [item for name in args.dataset or [] for item in ("--dataset", name)]
    if args.limit is not None:
        command += ["--limit", str(args.limit)]
    if args.budget_minutes is not None:
        command += ["--budget-minutes", str(args.budget_minutes)]
    if args.cache is not None:
        command += ["--cache-embeddings", str(args.cache)]
    if (run / "state.pt").is_file():
        command.append("--resume")
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps(metrics | {"finished": True}, indent=2) + "\n")
    return run


def held_out_cases(args: argparse.Namespace) -> list:
    """The validation part of the same split `medfm train` makes (same data, limit, fraction, seed)."""
    cases = discover_cases(args.data, args.dataset, args.limit)
    return split_cases(cases, args.val_fraction, args.seed, args.min_val_cases)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", default="litemedsam")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--dataset", action="append", help="only these datasets of a collection (repeatable)")
    parser.add_argument("--limit", type=int, help="at most this many cases per dataset, before the split")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--min-val-cases", type=int, default=0, help="hold out at least this many cases per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--budget-minutes", type=float, help="the same training-time budget for every recipe")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--cache", type=Path, help="embedding cache shared by the frozen-encoder recipes")
    parser.add_argument("--blend", type=float, nargs="*", default=[], metavar="ALPHA",
                        help="also score full/decoder runs blended with the base at these weights (WiSE-FT)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    runs = {recipe: train_recipe(recipe, args) for recipe in args.recipes}
    folders = {recipe: run / "best" for recipe, run in runs.items()}
    for recipe in [r for r in runs if r in BLENDABLE]:
        for alpha in args.blend:
            folders[f"{recipe}@{alpha:g}"] = blend_with_base(runs[recipe] / "best", alpha, runs[recipe] / f"blend-{alpha:g}")
    models = [load(args.base)] + [load(folder) for folder in folders.values()]
    for model, name in zip(models, ["zero-shot", *folders]):
        model.name = name
    started = time.perf_counter()
    evaluation = evaluate(models, held_out_cases(args), prompt="box", progress=sys.stderr.isatty())
    (args.out / "cases.json").write_text(json.dumps(rows_as_dicts(evaluation.rows), indent=1) + "\n")
    summary = summarize(evaluation.rows)
    datasets = sorted(summary["zero-shot"]["datasets"])  # datasets with a scored target (not only questionable boxes)
    metrics = {name: json.loads((runs[name.split("@")[0]] / "metrics.json").read_text()) for name in folders}
    table = {
        name: {
            "dice": {d: summary[name]["datasets"][d]["dice"]["mean"] for d in datasets if d in summary[name]["datasets"]},
            "mean_dice": summary[name]["mean_over_datasets"]["dice"],
            **({} if name == "zero-shot" else {
                "trainable_parameters": metrics[name]["trainable_parameters"],
                "training_minutes": metrics[name]["training_seconds"] / 60,
                "peak_memory_mb": metrics[name]["peak_memory_mb"],
                "epochs": len(metrics[name]["history"]),
                "steps": metrics[name]["history"][-1]["step"] if metrics[name]["history"] else 0,
            }),
        }
        for name in ["zero-shot", *folders]
    }
    result = {"base": args.base, "data": str(args.data), "datasets": datasets, "limit": args.limit,
              "val_fraction": args.val_fraction, "min_val_cases": args.min_val_cases, "seed": args.seed, "budget_minutes": args.budget_minutes,
              "validation_targets": {d: summary["zero-shot"]["datasets"][d]["n"] for d in datasets},
              "evaluation_seconds": time.perf_counter() - started, "table": table}
    (args.out / "adaptation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(result))


def markdown_table(result: dict) -> str:
    """The recipe x dataset table, one row per recipe, as README markdown."""
    datasets = result["datasets"]
    header = ["recipe", *datasets, "mean Dice", "trainable params", "train min", "peak MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, row in result["table"].items():
        cells = [name, *(f"{row['dice'][d]:.3f}" if d in row["dice"] else "-" for d in datasets), f"{row['mean_dice']:.3f}"]
        cells += ([f"{row['trainable_parameters']:,}", f"{row['training_minutes']:.1f}", f"{row['peak_memory_mb']:.0f}"]
                  if "trainable_parameters" in row else ["-", "-", "-"])
        lines.append("| " + " | ".join(cells) + " |")
    counts = ", ".join(f"{d} {n}" for d, n in result["validation_targets"].items())
    lines.append(f"\nValidation targets per dataset: {counts}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
