"""How much do the masks depend on the resize kernel? Every kernel medfm knows, on the held-out split
of the shared collection (the split medfm-litemedsam-ft was trained without), per dataset.

    .venv/bin/python benchmarks/resize_kernels.py --data ../shared/data/seg --per-dataset 5

A model is run once per kernel with everything else of its preprocessing unchanged (LiteMedSAM's
upstream pipeline is INTER_AREA); the table gives mean box-prompt Dice per dataset and kernel, and the
largest gap between kernels. A model that changes its mask with an invisible change of its input's
resampling is fragile: this is the measurement behind issue 19's robustness target.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from medfm.data.datasets import discover_cases, split_cases
from medfm.evaluate.runner import evaluate
from medfm.segment.model import load

KERNELS = ("area", "bilinear", "bicubic", "torch-bilinear-aa")


def cpu_description() -> str:
    """The CPU and its widest vector extensions (the same model runs at different speeds on each)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    width = "AVX512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    bf16 = ", AVX512-BF16" if " avx512_bf16" in flags else ""
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads, {width}{bf16})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "seg")
    parser.add_argument("--model", action="append", help="registry names (default: litemedsam and medfm-litemedsam-ft)")
    parser.add_argument("--per-dataset", type=int, default=5, help="held-out 2D cases per dataset")
    parser.add_argument("--dataset", action="append", help="only these datasets")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/resize_kernels.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # the split of medfm-litemedsam-ft's model card: at most 100 cases per dataset, 20% held out
    # (at least 4), seed 0; only its 2D cases (volumes are resampled slice by slice alike)
    held_out = [c for c in split_cases(discover_cases(args.data, args.dataset, 100), 0.2, 0, 4)[1] if not c.is_volume]
    chosen: dict[str, list] = defaultdict(list)
    for case in held_out:
        if len(chosen[case.dataset]) < args.per_dataset:
            chosen[case.dataset].append(case)
    cases = [c for group in chosen.values() for c in group]
    print(f"{cpu_description()}; {len(cases)} held-out cases from {len(chosen)} datasets", flush=True)
    results: dict = {}
    started = time.perf_counter()
    for name in args.model or ["litemedsam", "medfm-litemedsam-ft"]:
        base = load(name)
        variants = []
        for kernel in KERNELS:
            variant = dataclasses.replace(base, preprocess=dataclasses.replace(base.preprocess, interpolation=kernel))
            variant.name = kernel
            variants.append(variant)
        rows = evaluate(variants, cases, prompt="box", progress=True).rows
        scores: dict = defaultdict(lambda: defaultdict(list))
        for row in rows:
            if row.note is None:
                scores[row.dataset][row.model].append(row.dice)
        results[name] = {dataset: {kernel: float(np.mean(values)) for kernel, values in by_kernel.items()}
                         for dataset, by_kernel in sorted(scores.items())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cases": len(cases), "cpu": cpu_description(), "dice": results}, indent=2) + "\n")
    for name, table in results.items():
        print(f"\n### {name}: mean box Dice per kernel ({len(cases)} held-out cases)\n")
        print("| dataset | " + " | ".join(KERNELS) + " | largest gap |")
        print("| --- |" + " --- |" * (len(KERNELS) + 1))
        for dataset, by_kernel in table.items():
            values = [by_kernel.get(k, float("nan")) for k in KERNELS]
            print(f"| {dataset} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {max(values) - min(values):.3f} |")
        means = [float(np.mean([t[k] for t in table.values() if k in t])) for k in KERNELS]
        print("| mean over datasets | " + " | ".join(f"{v:.3f}" for v in means) + f" | {max(means) - min(means):.3f} |")
    print(f"\n{time.perf_counter() - started:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
