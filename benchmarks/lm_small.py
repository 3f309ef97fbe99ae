"""SmolLM2-135M (the base) against medfm's tuned LM on the validation split of ``medfm train-lm``:
accuracy per dataset and strategy with its Wilson 95% interval, beside the majority-class and chance
rates of the same items, and items per second on this CPU.

    PYTHONPATH=src python benchmarks/lm_small.py [--tuned medfm-lm-small] [--strategy few-shot:3]
    # or one model per process (two cores), then the table of both:
    PYTHONPATH=src python benchmarks/lm_small.py --role base --out out/base.json
    PYTHONPATH=src python benchmarks/lm_small.py --role tuned --tuned RUN/last --out out/tuned.json
    PYTHONPATH=src python benchmarks/lm_small.py --merge out/base.json out/tuned.json

The items are the validation questions of each dataset as `medfm.train.lm_data` splits them
(``--val-fraction`` as in training, 0.2 by default), all of them unless ``--limit N`` takes the first
N: the tuned model never saw them. ``--medqa-limit N`` adds the first N questions of MedQA's test set,
held out from training entirely (and from checkpoint choice). The machine is shared: run it once.

Decision rule, fixed before the first whole-split score was seen (2026-12-05): the tuned model
"beats the base" when its zero-shot accuracy averaged over the validation sets (MedMCQA, PubMedQA,
MMLU medical; the unweighted mean of the per-set accuracies, every validation item, option
log-likelihood per character as ``medfm qa`` scores) is higher than the base's on the same items.
The same mean picks among candidate runs. Per-set figures, their intervals and the paired
difference (a bootstrap over items, resampled within each set) are printed beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
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
ROLES = ("base", "tuned")
BOOTSTRAP = 2000


def cpu_name() -> str:
    """The CPU line of benchmarks/litemedsam_speed.py (model, cores, vector extensions), and AMX-bf16."""
    spec = importlib.util.spec_from_file_location("litemedsam_speed", REPO / "benchmarks" / "litemedsam_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return f"{module.cpu_name()}{', AMX-bf16' if cpu_has_amx_bf16() else ''}"


def score(lm: medfm.lm.LanguageModel, items: list, strategy: str, exemplars: list) -> dict:
    """Accuracy with its interval, n, majority-class and chance rates, items/s, and each item's
    outcome (id -> 1/0, for the paired difference) of ``lm`` on ``items``."""
    parsed = parse_strategy(strategy)
    started = time.perf_counter()
    outcomes: dict[str, int] = {}
    scored = []
    for item in items:
        try:
            outcomes[item.id] = int(answer(lm, item, parsed, exemplars=exemplars).prediction == item.answer)
            scored.append(item)
        except PromptError as error:  # over the context length: skipped, as the harness skips it
            print(f"skipped {item.dataset} {item.id}: {error}", file=sys.stderr)
    seconds = time.perf_counter() - started
    n, correct = len(scored), sum(outcomes.values())
    if not n:
        return {"n": 0, "correct": 0, "accuracy": 0.0, "ci95": (0.0, 1.0), "majority_class_rate": 0.0, "chance_rate": 0.0,
                "items_per_second": 0.0, "outcomes": {}}
    return {"n": n, "correct": correct, "accuracy": correct / n, "ci95": wilson_interval(correct, n),
            "majority_class_rate": max(Counter(item.answer for item in scored).values()) / n,
            "chance_rate": sum(1 / len(item.options) for item in scored) / n, "items_per_second": n / seconds,
            "outcomes": outcomes}


def paired_difference(base: dict[str, dict], tuned: dict[str, dict], seed: int = 0) -> tuple[float, float, float]:
    """Mean over sets of (tuned - base) accuracy on the items both scored, and its 95% bootstrap
    interval (items resampled within each set, the same items for both models)."""
    pairs = {}
    for dataset in base:
        common = sorted(set(base[dataset]["outcomes"]) & set(tuned[dataset]["outcomes"]))
        pairs[dataset] = [tuned[dataset]["outcomes"][i] - base[dataset]["outcomes"][i] for i in common]
    pairs = {name: values for name, values in pairs.items() if values}
    mean = lambda groups: sum(sum(v) / len(v) for v in groups.values()) / len(groups)  # noqa: E731
    rng = random.Random(seed)
    draws = sorted(mean({name: rng.choices(values, k=len(values)) for name, values in pairs.items()})
                   for _ in range(BOOTSTRAP))
    return mean(pairs), draws[int(0.025 * BOOTSTRAP)], draws[int(0.975 * BOOTSTRAP) - 1]


def print_table(report: dict) -> None:
    """The markdown table of ``report`` (one or both roles), the mean over the validation sets and,
    with both roles, the decision and the paired difference."""
    results, models = report["results"], report["models"]
    print(f"\nCPU: {report['cpu']}; base {models.get('base', '-')}, tuned {models.get('tuned', '-')}; "
          f"validation split (val fraction {report['val_fraction']}), {report['selection']}")
    print("| dataset | strategy | n | base [95% CI] | tuned [95% CI] | majority class | chance | items/s base / tuned |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for dataset, by_strategy in results.items():
        for strategy, by_role in by_strategy.items():
            cells = [f"{r['accuracy']:.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if (r := by_role.get(role)) else "-"
                     for role in ROLES]
            first = next(iter(by_role.values()))
            speed = " / ".join(f"{by_role[role]['items_per_second']:.2f}" if role in by_role else "-" for role in ROLES)
            print(f"| {dataset} | {strategy} | {first['n']} | {cells[0]} | {cells[1]} | {first['majority_class_rate']:.3f} | "
                  f"{first['chance_rate']:.3f} | {speed} |")
    strategies = sorted({strategy for by_strategy in results.values() for strategy in by_strategy})
    for strategy in strategies:
        sets = {d: s[strategy] for d, s in results.items() if d in DATASETS and strategy in s}
        if not sets:
            continue
        means = {role: sum(by_role[role]["accuracy"] for by_role in sets.values()) / len(sets)
                 for role in ROLES if all(role in by_role for by_role in sets.values())}
        cells = [f"{means[role]:.3f}" if role in means else "-" for role in ROLES]
        majority = sum(next(iter(r.values()))["majority_class_rate"] for r in sets.values()) / len(sets)
        chance = sum(next(iter(r.values()))["chance_rate"] for r in sets.values()) / len(sets)
        print(f"| mean of {len(sets)} validation sets | {strategy} | - | {cells[0]} | {cells[1]} | {majority:.3f} | {chance:.3f} | |")
        if len(means) == 2:
            diff, low, high = paired_difference({d: r["base"] for d, r in sets.items()}, {d: r["tuned"] for d, r in sets.items()})
            verdict = "beats" if means["tuned"] > means["base"] else "does not beat"
            print(f"{strategy}: tuned - base = {diff:+.3f} (paired bootstrap 95% [{low:+.3f}, {high:+.3f}]): the tuned model "
                  f"{verdict} the base by the rule (higher mean validation accuracy)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--tuned", default=None, help="registry name or folder (default: medfm-lm-small when registered)")
    parser.add_argument("--role", choices=ROLES, action="append", default=None, help="score only this model (repeatable)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=None, help="the first N validation questions per dataset (default: all)")
    parser.add_argument("--dataset", choices=DATASETS, action="append", default=None, help="only these sets (default: all three)")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--medqa-limit", type=int, default=0, help="also the first N MedQA test questions (never trained on)")
    parser.add_argument("--strategy", action="append", default=None, help="zero-shot (default), few-shot:K; repeatable")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one: the machine is shared)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "lm_small.json")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="print the table of these result files, score nothing")
    args = parser.parse_args(argv)
    if args.merge:
        reports = [json.loads(path.read_text()) for path in args.merge]
        merged = {**reports[0], "models": {}, "results": {}}
        for report in reports:
            merged["models"].update(report["models"])
            for dataset, by_strategy in report["results"].items():
                for strategy, by_role in by_strategy.items():
                    merged["results"].setdefault(dataset, {}).setdefault(strategy, {}).update(by_role)
        print_table(merged)
        return 0
    torch.set_num_threads(args.threads)
    strategies = args.strategy or ["zero-shot"]
    tuned = args.tuned or ("medfm-lm-small" if "medfm-lm-small" in medfm.lm.available_lms() else None)
    roles = args.role or list(ROLES)
    models = {role: name for role, name in (("base", args.base), ("tuned", tuned)) if role in roles and name}
    cpu = cpu_name()
    selection = f"first {args.limit} per set" if args.limit else "every validation item"
    print(f"CPU: {cpu}; torch threads {args.threads}", flush=True)
    sources = read_sources([args.data_root / name for name in args.dataset or DATASETS], "instruct", args.val_fraction)
    sets = {source.name: (source.val_items[: args.limit], read_dataset(source.folder).exemplars) for source in sources}
    if args.medqa_limit:
        medqa = read_dataset(args.data_root / HEADLINE)
        sets[HEADLINE] = (medqa.items[: args.medqa_limit], medqa.exemplars)
    results: dict = {}
    for role, name in models.items():
        lm = medfm.lm.load(name)
        for strategy in strategies:
            for dataset, (items, pool) in sets.items():
                exemplars = exemplars_for(pool, parse_strategy(strategy).count, 0, dataset) if strategy.startswith("few-shot") else []
                results.setdefault(dataset, {}).setdefault(strategy, {})[role] = result = score(lm, items, strategy, exemplars)
                print(f"{role} {dataset} {strategy}: {result['correct']}/{result['n']} ({result['items_per_second']:.2f} items/s)",
                      flush=True)
                _write(args.out, report := {"cpu": cpu, "threads": args.threads, "val_fraction": args.val_fraction,
                                            "selection": selection, "models": models, "results": results})
    print_table(report)
    return 0


def _write(path: Path, report: dict) -> None:
    """``report`` as JSON, replaced atomically after every dataset (a killed run keeps what it scored)."""
    from medfm.io.writers import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
