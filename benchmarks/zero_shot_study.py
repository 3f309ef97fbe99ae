"""The zero-shot generalist study ("Generalist Vision Foundation Models for Medical Imaging: A Case
Study of Segment Anything Model on Zero-Shot Medical Segmentation", Shi et al. 2023), redone with
medfm: every available model over every modality of a collection, with box, 1-point and 3-point
prompts, one table (modality x prompt mode x model, Dice and NSD) and one figure.

    .venv/bin/python benchmarks/zero_shot_study.py --data ../shared/data/seg --limit 10 --out out/zero_shot

Models whose weights are not on this machine (SAM and MedSAM need a download) are listed as
skipped, not silently dropped. One image embedding serves all three prompt modes.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from medfm.errors import MedfmError
from medfm.evaluate.runner import evaluate
from medfm.segment.model import available_models, load

MODES = ("box", "points:1", "points:3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "seg")
    parser.add_argument("--out", type=Path, default=Path("out/zero_shot"))
    parser.add_argument("--limit", type=int, default=10, help="cases per dataset (first N in sorted order)")
    parser.add_argument("--model", action="append", help="registry names (default: every one that loads here)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models, skipped = [], {}
    for name in args.model or available_models():
        try:
            models.append(load(name))
        except MedfmError as error:
            skipped[name] = str(error)
    evaluation = evaluate(models, args.data, prompt=list(MODES), limit_per_dataset=args.limit, progress=True)
    scores: dict = defaultdict(lambda: defaultdict(list))
    for row in evaluation.rows:
        if row.note is None:
            mode = "box" if row.prompt == "box3d" else row.prompt
            scores[(row.modality or "unknown", mode, row.model)]["dice"].append(row.dice)
            scores[(row.modality or "unknown", mode, row.model)]["nsd"].append(row.nsd)
    table = [
        {"modality": m, "prompt": p, "model": model, "n": len(v["dice"]),
         "dice": round(float(np.mean(v["dice"])), 4), "nsd": round(float(np.mean(v["nsd"])), 4)}
        for (m, p, model), v in sorted(scores.items())
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zero_shot.json").write_text(json.dumps(
        {"cases": len(evaluation.cases), "limit_per_dataset": args.limit, "seconds": round(evaluation.seconds, 1),
         "skipped_models": skipped, "table": table}, indent=2) + "\n")
    print(f"{len(evaluation.cases)} cases, {evaluation.seconds:.0f} s; skipped models: {', '.join(skipped) or 'none'}\n")
    print("| modality | prompt | model | n | Dice | NSD |\n| --- | --- | --- | --- | --- | --- |")
    for row in table:
        print(f"| {row['modality']} | {row['prompt']} | {row['model']} | {row['n']} | {row['dice']:.3f} | {row['nsd']:.3f} |")
    _figure(table, args.out / "zero_shot.png")
    print(f"\nwrote {args.out / 'zero_shot.json'} and {args.out / 'zero_shot.png'}")


def _figure(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modalities = sorted({r["modality"] for r in table})
    runs = sorted({(r["model"], r["prompt"]) for r in table}, key=lambda run: (run[0], MODES.index(run[1])))
    width = 0.8 / len(runs)
    figure, axis = plt.subplots(figsize=(max(8, 1.1 * len(modalities)), 4.5))
    for index, (model, mode) in enumerate(runs):
        values = [next((r["dice"] for r in table if r["modality"] == m and r["model"] == model and r["prompt"] == mode), np.nan)
                  for m in modalities]
        axis.bar(np.arange(len(modalities)) + (index - (len(runs) - 1) / 2) * width, values, width, label=f"{model}, {mode}")
    axis.set_xticks(np.arange(len(modalities)), modalities, rotation=30, ha="right")
    axis.set_ylabel("mean Dice")
    axis.set_ylim(0, 1)
    axis.set_title("Zero-shot segmentation by modality and prompt")
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


if __name__ == "__main__":
    main()
