"""The QA harness on the shared medical exam sets: accuracy with its Wilson 95% interval beside the
majority-class and chance rates, accuracy under each option-length normalisation (the measurement
behind medfm.qa's default), and items per second on this CPU.

    PYTHONPATH=src python benchmarks/qa_harness.py --limit 25 [--cot-limit 5] --out out/qa_bench

The machine is shared: run it once, at a modest size. Every figure in the README's "Medical QA"
table comes from this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

import medfm.lm
import medfm.qa

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "text"
DATASETS = ("medqa_usmle_4opt_test", "pubmedqa_labeled", "medmcqa_dev", "mmlu_medical")


def cpu_name() -> str:
    """The CPU line of benchmarks/litemedsam_speed.py (model, cores, vector extensions)."""
    spec = importlib.util.spec_from_file_location("litemedsam_speed", REPO / "benchmarks" / "litemedsam_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cpu_name()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=medfm.lm.DEFAULT_LM)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=25, help="items per dataset (the first N)")
    parser.add_argument("--cot-limit", type=int, default=0, help="also run chain-of-thought on the first N MedQA items")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "qa_bench")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; torch threads {args.threads}; model {args.model}")
    lm = medfm.lm.load(args.model)
    folders = [args.data_root / name for name in DATASETS]
    runs = [("zero-shot", folders, args.limit, args.out / "zero-shot")]
    if args.cot_limit:
        runs.append(("cot", folders[:1], args.cot_limit, args.out / "cot"))
    results = {}
    for strategy, data, limit, out in runs:
        summary = medfm.qa.evaluate(lm, data, out, strategy=strategy, limit=limit, max_new_tokens=args.max_new_tokens)
        results[strategy] = summary
        print(f"\n{strategy} (normalisation {summary['settings']['normalisation']}), "
              f"{summary['items_per_second']} items/s over {summary['scored_this_run']} items scored this run")
        print(" | ".join(medfm.qa.SUMMARY_HEADER + ["accuracy per char / token / sum"]))
        for row, (name, entry) in zip(medfm.qa.summary_table(summary), summary["datasets"].items()):
            by = entry.get("accuracy_by_normalisation")
            print(" | ".join(row + ([" / ".join(f"{by[key]:.3f}" for key in ("char", "token", "sum"))] if by else ["-"])))
    (args.out / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
