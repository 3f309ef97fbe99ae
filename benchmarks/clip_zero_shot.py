"""Zero-shot classification of medfm-clip-small on the held-out part of ../shared/data/vl, against
chance and against a linear probe trained on the same frozen image features.

    nice -n 10 .venv/bin/python scripts/train_clip_small.py features   # cache (once)
    nice -n 10 .venv/bin/python benchmarks/clip_zero_shot.py --out out/clip_zero_shot.json

The held-out images are those whose patient (COVID-19 notes) or lesion (HAM10000) or image hashes
into the held-out 20% (`medfm.clip.data.is_held_out`); the cached subset is deterministic. The
shipped model (src/medfm/clip/weights/medfm-clip-small) scores them through its prompt ensemble:
a softmax over the class names, or for the COVID-19 notes CheXzero's "COVID-19" vs
"no COVID-19". Chance is the best constant guess (the majority class) and AUC 0.5. The linear
probe is an L2-regularised logistic regression on the frozen LiteMedSAM features (mean and max
pooled), its L2 weight picked by 3-fold cross-validation on the training subset.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import medfm.clip
from medfm.clip.data import DATASETS, TASKS, VLRecord, is_validation
from medfm.clip.zeroshot import zero_shot_probabilities

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from litemedsam_speed import cpu_name  # noqa: E402 - the benchmarks' one description of the CPU
from train_clip_small import load_cache  # noqa: E402


def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None without both classes."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def macro_auc(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """Binary: AUC of the first class; multi-class: mean one-vs-rest AUC over the classes present."""
    if probabilities.shape[1] == 2:
        return auc(probabilities[:, 0], targets == 0)
    values = [auc(probabilities[:, k], targets == k) for k in range(probabilities.shape[1])]
    return float(np.mean([v for v in values if v is not None]))


def class_targets(records: list[VLRecord], dataset: str) -> np.ndarray:
    """Index of each record's class in the task (finding tasks: 0 = finding present, 1 = absent)."""
    return np.array([TASKS[dataset].target(r) for r in records])


def zero_shot(model: medfm.clip.DualEncoder, records: list[VLRecord], grids: torch.Tensor, dataset: str) -> np.ndarray:
    """(N, K) class probabilities through the model's prompt ensemble for each image's modality."""
    task = TASKS[dataset]
    with torch.inference_mode():
        embeds = model.embed_image_features(grids)
    out = np.zeros((len(records), 2 if task.finding else len(task.classes)))
    for modality in sorted({r.modality for r in records}):
        rows = [i for i, r in enumerate(records) if r.modality == modality]
        if task.finding is not None:
            present = zero_shot_probabilities(model, embeds[rows], [task.finding], model.templates(modality), "pos-neg")[:, 0]
            out[rows] = torch.stack([present, 1 - present], dim=1).numpy()
        else:
            out[rows] = zero_shot_probabilities(model, embeds[rows], task.classes, model.templates(modality)).numpy()
    return out


def pooled(grids: torch.Tensor) -> torch.Tensor:
    """The frozen features a probe sees: mean and max over the feature map's cells."""
    return torch.cat([grids.mean(dim=(2, 3)), grids.amax(dim=(2, 3))], dim=1)


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> torch.nn.Linear:
    """Multinomial logistic regression by L-BFGS with an L2 penalty."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), y) + l2 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def linear_probe(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, classes: int) -> np.ndarray:
    """Held-out probabilities of a probe whose L2 weight is chosen by 3-fold CV on the training set."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    y = torch.as_tensor(train_y)
    folds = np.arange(len(y)) % 3
    best = None
    for l2 in (1e-4, 1e-3, 1e-2, 1e-1):
        correct = 0
        for fold in range(3):
            inside, outside = torch.as_tensor(folds != fold), torch.as_tensor(folds == fold)
            probe = fit_probe(train_x[inside], y[inside], classes, l2)
            with torch.no_grad():
                correct += int((probe(train_x[outside]).argmax(1) == y[outside]).sum())
        if best is None or correct > best[0]:
            best = (correct, l2)
    probe = fit_probe(train_x, y, classes, best[1])
    with torch.no_grad():
        return torch.softmax(probe(test_x), dim=1).numpy()


def evaluate(dataset: str, model: medfm.clip.DualEncoder, split: str = "held_out") -> dict:
    """One table row: ``split`` ``held_out`` (the cached held-out images; probe fitted on the cached
    training side) or ``validation`` (the validation part of the training side; probe fitted on the rest)."""
    train_records, train_grids = load_cache(dataset, "train")
    if split == "held_out":
        records, grids = load_cache(dataset, "held_out")
    else:
        inside = torch.tensor([is_validation(r) for r in train_records], dtype=torch.bool)
        records = [r for r, v in zip(train_records, inside.tolist()) if v]
        train_records = [r for r, v in zip(train_records, inside.tolist()) if not v]
        grids, train_grids = train_grids[inside], train_grids[~inside]
    targets, train_targets = class_targets(records, dataset), class_targets(train_records, dataset)
    task = TASKS[dataset]
    classes = 2 if task.finding else len(task.classes)
    shot = zero_shot(model, records, grids, dataset)
    probe = linear_probe(pooled(train_grids), train_targets, pooled(grids), classes)
    majority = np.bincount(train_targets, minlength=classes).argmax()
    return {
        "dataset": dataset, "split": split,
        "task": f"'{task.finding}' vs 'no {task.finding}' (CheXzero)" if task.finding else f"softmax over {classes} classes",
        "n_held_out": len(records), "n_train": len(train_records), "classes": classes,
        "chance_accuracy": float(np.mean(targets == majority)), "chance_auc": 0.5,
        "zero_shot_accuracy": float(np.mean(shot.argmax(1) == targets)), "zero_shot_auc": macro_auc(shot, targets),
        "probe_accuracy": float(np.mean(probe.argmax(1) == targets)), "probe_auc": macro_auc(probe, targets),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="medfm-clip-small")
    parser.add_argument("--out", type=Path, default=Path("out/clip_zero_shot.json"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--split", choices=["held_out", "validation"], default="held_out",
                        help="validation: the validation part of the training side (for model choices; "
                        "medfm.clip.data.is_validation), the probe fitted on the rest")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = medfm.clip.load(args.model)
    rows = [evaluate(dataset, model, args.split) for dataset in args.datasets]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{args.model} on the {args.split} split; CPU: {cpu_name()}")
    print(f"| dataset | task | n {args.split.replace('_', '-')} (train) | chance acc | zero-shot acc | zero-shot AUC | linear probe acc | linear probe AUC |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['dataset']} | {r['task']} | {r['n_held_out']} ({r['n_train']}) | {r['chance_accuracy']:.3f} | "
              f"{r['zero_shot_accuracy']:.3f} | {r['zero_shot_auc']:.3f} | {r['probe_accuracy']:.3f} | {r['probe_auc']:.3f} |")


if __name__ == "__main__":
    main()
