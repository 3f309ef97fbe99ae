"""SmolLM2-135M (the base) against medfm's tuned LM on the validation split of ``medfm train-lm``:
accuracy per dataset and strategy with its Wilson 95% interval, beside the majority-class and chance
rates of the same items, and items per second on this CPU.

    PYTHONPATH=src python benchmarks/lm_small.py --limit 100 [--tuned medfm-lm-small] [--strategy few-shot:3]

The items are the first ``--limit`` validation questions of each dataset as `medfm.train.lm_data`
splits them (``--val-fraction`` as in training, 0.2 by default): the tuned model never saw them;
they are exactly what ``medfm train-lm`` scores after each epoch. ``--medqa-limit N`` adds the first N
questions of MedQA's test set, held out from training entirely. The machine is shared: run it once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import medfm.lm
from medfm.errors import PromptError
from medfm.qa import read_dataset, wilson_interval
from medfm.qa.strategies import answer, exemplars_for, parse_strategy
from medfm.train.lm import cpu_has_amx_bf16
from medfm.train.lm_data import read_sources

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "text"
DATASETS = ("medmcqa_dev", "pubmedqa_labeled", "mmlu_medical")
HEADLINE = "medqa_usmle_4opt_test"


def cpu_name() -> str:
    """The CPU line of benchmarks/litemedsam_speed.py (model, cores, vector extensions), and AMX-bf16."""
    spec = importlib.util.spec_from_file_location("litemedsam_speed", REPO / "benchmarks" / "litemedsam_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return f"{module.cpu_name()}{', AMX-bf16' if cpu_has_amx_bf16() else ''}"


def score(lm: medfm.lm.LanguageModel, items: list, strategy: str, exemplars: list) -> dict:
    """Accuracy with its interval, n, majority-class and chance rates, and items/s of ``lm`` on ``items``."""
    parsed = parse_strategy(strategy)
    started = time.perf_counter()
    scored, correct = [], 0
    for item in items:
        try:
            correct += answer(lm, item, parsed, exemplars=exemplars).prediction == item.answer
            scored.append(item)
        except PromptError as error:  # over the context length: skipped, as the harness skips it
            print(f"skipped {item.dataset} {item.id}: {error}", file=sys.stderr)
    seconds = time.perf_counter() - started
    items, n = scored, len(scored)
    if not n:
        return {"n": 0, "correct": 0, "accuracy": 0.0, "ci95": (0.0, 1.0), "majority_class_rate": 0.0, "chance_rate": 0.0,
                "items_per_second": 0.0}
    return {"n": n, "correct": correct, "accuracy": correct / n, "ci95": wilson_interval(correct, n),
            "majority_class_rate": max(Counter(item.answer for item in items).values()) / n,
            "chance_rate": sum(1 / len(item.options) for item in items) / n, "items_per_second": n / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--tuned", default=None, help="registry name or folder (default: medfm-lm-small when registered)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=100, help="validation questions per dataset (the first N)")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--medqa-limit", type=int, default=0, help="also the first N MedQA test questions (never trained on)")
    parser.add_argument("--strategy", action="append", default=None, help="zero-shot (default), few-shot:K; repeatable")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "lm_small.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    strategies = args.strategy or ["zero-shot"]
    tuned = args.tuned or ("medfm-lm-small" if "medfm-lm-small" in medfm.lm.available_lms() else None)
    print(f"CPU: {cpu_name()}; torch threads {args.threads}")
    sources = read_sources([args.data_root / name for name in DATASETS], "instruct", args.val_fraction)
    sets = {source.name: (source.val_items[: args.limit], read_dataset(source.folder).exemplars) for source in sources}
    if args.medqa_limit:
        medqa = read_dataset(args.data_root / HEADLINE)
        sets[HEADLINE] = (medqa.items[: args.medqa_limit], medqa.exemplars)
    models = {"base": args.base, **({"tuned": tuned} if tuned else {})}
    results: dict = {}
    for role, name in models.items():
        lm = medfm.lm.load(name)
        for strategy in strategies:
            for dataset, (items, pool) in sets.items():
                exemplars = exemplars_for(pool, parse_strategy(strategy).count, 0, dataset) if strategy.startswith("few-shot") else []
                results.setdefault(dataset, {}).setdefault(strategy, {})[role] = score(lm, items, strategy, exemplars)
    print(f"\nbase {args.base}, tuned {tuned or '-'}; validation split (val fraction {args.val_fraction}), first {args.limit} per set")
    print("dataset | strategy | n | base [95% CI] | tuned [95% CI] | majority class | chance | items/s base / tuned")
    for dataset, by_strategy in results.items():
        for strategy, by_role in by_strategy.items():
            cells = [f"{r['accuracy']:.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if (r := by_role.get(role)) else "-"
                     for role in ("base", "tuned")]
            first = by_role["base"]
            speed = " / ".join(f"{by_role[role]['items_per_second']:.2f}" for role in ("base", "tuned") if role in by_role)
            print(f"{dataset} | {strategy} | {first['n']} | {cells[0]} | {cells[1]} | {first['majority_class_rate']:.3f} | "
                  f"{first['chance_rate']:.3f} | {speed}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu_name(), "models": models, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
