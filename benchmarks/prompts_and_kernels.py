"""Box, clicks, interactive correction and the resize kernel, for several models side by side in one run,
on the held-out split of the default's model card (issue 19's targets).

    .venv/bin/python benchmarks/prompts_and_kernels.py --data ../shared/data/seg \\
        --model litemedsam --model medfm-litemedsam-ft --model out/new/best --per-dataset 8

Per model, dataset and prompt mode (``box``, ``points:1``, ``points:3``, ``iterative:5`` by default)
the mean Dice over the held-out 2D targets (questionable prompts kept out, as ``medfm evaluate``
does); then the box Dice of each model on chest X-rays under each resize kernel, and the largest
gap between kernels. Every image is encoded once for the models that share an image encoder.
Before scoring, it checks that each mode really hands the predictor different prompts (a box mode no
points, ``points:K`` K clicks and no box), and after, that no two modes gave the same Dice on every
target: a benchmark whose modes silently collapse into one measured nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from litemedsam_speed import cpu_name  # noqa: E402 - the benchmarks' one description of the CPU

from medfm.data.datasets import Case, discover_cases, split_cases  # noqa: E402
from medfm.evaluate.runner import evaluate  # noqa: E402
from medfm.evaluate.simulate import check_mode, iterative_clicks, simulate_prompts  # noqa: E402
from medfm.io import read_image  # noqa: E402
from medfm.segment.model import load  # noqa: E402

KERNELS = ("area", "bilinear", "bicubic", "torch-bilinear-aa")
MODES = ("box", "points:1", "points:3", "iterative:5")


def held_out(data: Path) -> list[Case]:
    """The 2D cases held out by the default's model card: at most 100 cases per dataset, 20% held out
    by patient (at least 4), seed 0 (`scripts/ship_litemedsam_ft.py`, `medfm train --val-fraction 0.2
    --min-val-cases 4 --limit 100`)."""
    return [c for c in split_cases(discover_cases(data, None, 100), 0.2, 0, 4)[1] if not c.is_volume]


def first_per_dataset(cases: list[Case], count: int) -> list[Case]:
    chosen: dict[str, list[Case]] = defaultdict(list)
    for case in cases:
        if len(chosen[case.dataset]) < count:
            chosen[case.dataset].append(case)
    return [c for group in chosen.values() for c in group]


def check_prompts_differ(cases: list[Case], modes: list[str]) -> None:
    """Each mode's simulated prompts are of its own kind (AssertionError otherwise): the box modes a
    box and no clicks, ``points:K`` exactly K clicks and no box."""
    for case in cases[:3]:
        mask = read_image(case.mask_path).array
        for mode in modes:
            prompts = simulate_prompts(mask, mode)
            for prompt in prompts:
                if mode == "box" or iterative_clicks(mode) is not None:
                    assert prompt.box is not None and prompt.points is None, f"{mode} handed over clicks"
                else:
                    wanted = int(mode.split(":")[1].split("+")[0])
                    assert prompt.box is None and len(prompt.points.coords) == wanted, \
                        f"{mode} handed over {prompt.box} and {prompt.points}"


def mode_table(rows: list) -> dict:
    """{model: {mode: {dataset: mean Dice}}} over targets whose prompt is not questionable."""
    scores: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in rows:
        if row.note is None:
            scores[row.model][row.prompt][row.dataset].append(row.dice)
    return {model: {mode: {d: float(np.mean(v)) for d, v in sorted(by_dataset.items())} for mode, by_dataset in by_mode.items()}
            for model, by_mode in scores.items()}


def check_modes_not_identical(rows: list, modes: list[str]) -> None:
    """No two modes may give one model the same Dice on every target (the first version of this
    benchmark scored box, points:1 and points:3 alike because its prompts never changed)."""
    per: dict = defaultdict(dict)
    for row in rows:
        per[(row.model, row.prompt)][(row.dataset, row.case, row.label)] = row.dice
    for model in {row.model for row in rows}:
        for i, first in enumerate(modes):
            for second in modes[i + 1:]:
                a, b = per[(model, first)], per[(model, second)]
                assert a.keys() != b.keys() or any(a[k] != b[k] for k in a), \
                    f"{model}: modes {first} and {second} gave identical Dice on every target"


def kernel_gaps(names: list[str], cases: list[Case]) -> dict:
    """{model: {kernel: mean box Dice}} with everything but the resize kernel unchanged."""
    variants = []
    for name in names:
        model = load(name)
        for kernel in KERNELS:
            variant = dataclasses.replace(model, preprocess=dataclasses.replace(model.preprocess, interpolation=kernel))
            variant.name = f"{name}|{kernel}"
            variants.append(variant)
    scores: dict = defaultdict(lambda: defaultdict(list))
    for row in evaluate(variants, cases, prompt="box").rows:
        if row.note is None:
            name, kernel = row.model.rsplit("|", 1)
            scores[name][kernel].append(row.dice)
    return {name: {k: float(np.mean(v)) for k, v in by_kernel.items()} for name, by_kernel in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "seg")
    parser.add_argument("--model", action="append", help="registry names or model folders (default: litemedsam, medfm-litemedsam-ft)")
    parser.add_argument("--mode", action="append", help=f"prompt modes (default: {', '.join(MODES)})")
    parser.add_argument("--per-dataset", type=int, default=8, help="held-out 2D cases per dataset")
    parser.add_argument("--kernel-dataset", default="covid_cxr_lungs_v7")
    parser.add_argument("--kernel-cases", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/prompts_and_kernels.json"))
    args = parser.parse_args()
    modes = args.mode or list(MODES)
    for mode in modes:
        check_mode(mode)
    names = args.model or ["litemedsam", "medfm-litemedsam-ft"]
    torch.set_num_threads(args.threads)
    split = held_out(args.data)
    cases = first_per_dataset(split, args.per_dataset)
    kernel_cases = [c for c in split if c.dataset == args.kernel_dataset][: args.kernel_cases]
    check_prompts_differ(cases, modes)
    print(f"{cpu_name()}, {args.threads} threads; {len(cases)} held-out 2D cases from "
          f"{len({c.dataset for c in cases})} datasets; kernels on {len(kernel_cases)} {args.kernel_dataset} cases", flush=True)

    started = time.perf_counter()
    models = [load(name) for name in names]
    for name, model in zip(names, models):
        model.name = name  # folders are named after their folder (best, last): keep what was asked for
    rows = evaluate(models, cases, prompt=modes, progress=True).rows
    check_modes_not_identical(rows, modes)
    table = mode_table(rows)
    targets = defaultdict(int)
    for row in rows:
        if row.model == names[0] and row.prompt == modes[0] and row.note is None:
            targets[row.dataset] += 1
    gaps = kernel_gaps(names, kernel_cases)
    seconds = time.perf_counter() - started

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu_name(), "cases": len(cases), "targets": targets, "modes": modes,
                                    "dice": table, "kernel_dataset": args.kernel_dataset,
                                    "kernel_cases": len(kernel_cases), "kernels": gaps, "seconds": seconds}, indent=2) + "\n")
    datasets = sorted(targets)
    header = "| dataset | n | " + " | ".join(f"{n} {m}" for n in names for m in modes) + " |"
    print(f"\n### held-out Dice per dataset ({len(cases)} cases, {sum(targets.values())} targets)\n")
    print(header)
    print("| --- | --- |" + " --- |" * (len(names) * len(modes)))
    for dataset in datasets:
        values = [table[n][m].get(dataset, float("nan")) for n in names for m in modes]
        print(f"| {dataset} | {targets[dataset]} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    means = [float(np.mean([table[n][m][d] for d in datasets if d in table[n][m]])) for n in names for m in modes]
    print("| **mean over datasets** | | " + " | ".join(f"**{v:.3f}**" for v in means) + " |")
    print(f"\n### box Dice per resize kernel, {len(kernel_cases)} held-out {args.kernel_dataset} cases\n")
    print("| model | " + " | ".join(KERNELS) + " | largest gap |")
    print("| --- |" + " --- |" * (len(KERNELS) + 1))
    for name in names:
        values = [gaps[name][k] for k in KERNELS]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {max(values) - min(values):.3f} |")
    print(f"\n{seconds:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
