"""Does SAM's answer to an ambiguous click, three candidate masks and the one with the best
predicted IoU, give medfm's LiteMedSAM models the click skill they lack?

On the held-out split of the default's model card (`prompts_and_kernels.held_out`, 2D cases, the
first ``--per-dataset`` of each dataset), every target is prompted with evaluate's simulated clicks
(``points:K``, seed 0; questionable targets left out) and scored three ways: the single mask token
(what medfm uses), the multimask candidate with the highest predicted IoU (what segment-anything's
predictor does for one click), and the best candidate by its Dice (an oracle: the most a better
choice could give). Means are over datasets.

    .venv/bin/python benchmarks/click_multimask.py [--per-dataset 2] [--mode points:1 --mode points:3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import medfm
from medfm.evaluate.metrics import dice
from medfm.evaluate.simulate import simulate_prompts
from prompts_and_kernels import first_per_dataset, held_out  # this folder is on sys.path as a script

MODELS = ["litemedsam", "medfm-litemedsam-ft", "medfm-litemedsam-clicks"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "seg")
    parser.add_argument("--per-dataset", type=int, default=2)
    parser.add_argument("--mode", action="append", help="points:K modes (default points:1 and points:3)")
    args = parser.parse_args()
    modes = args.mode or ["points:1", "points:3"]
    cases = first_per_dataset(held_out(args.data), args.per_dataset)
    models = [medfm.load(name) for name in MODELS]
    scores: dict[tuple[str, str], dict[str, list[tuple[float, float, float]]]] = {}
    for case in cases:
        image = medfm.read_image(case.image_path, modality=case.modality if case.modality in {"CT", "MR"} else None)
        reference = medfm.read_image(case.mask_path).array
        for model in models:
            predictor = model.predictor()
            predictor.set_image(image)
            for mode in modes:
                for prompt in (p for p in simulate_prompts(reference, mode, seed=0) if p.note is None):
                    truth = reference == prompt.label
                    clicks = dict(points=prompt.points.coords[None], point_labels=prompt.points.labels[None])
                    single = predictor.predict(**clicks)
                    multi = predictor.predict(**clicks, multimask=True)
                    oracle = max(dice(candidate, truth) for candidate in multi.candidates[0])
                    scores.setdefault((model.name, mode), {}).setdefault(case.dataset, []).append(
                        (dice(single.masks[0], truth), dice(multi.masks[0], truth), oracle))
    print(f"{len(cases)} held-out cases; mean Dice over datasets")
    print("| model | prompt | single mask | multimask, best predicted IoU | multimask, oracle |")
    print("| --- | --- | --- | --- | --- |")
    for (name, mode), by_dataset in scores.items():
        single, chosen, oracle = np.mean([np.mean(v, axis=0) for v in by_dataset.values()], axis=0)
        print(f"| {name} | {mode} | {single:.3f} | {chosen:.3f} | {oracle:.3f} |")


if __name__ == "__main__":
    main()
