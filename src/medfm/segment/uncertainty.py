"""SAM-U: multi-box prompts give a prediction and a per-pixel uncertainty map.

Deng et al. (SAM-U, 2023) prompt SAM with several randomly jittered versions of one box; the mean
probability is the prediction and the disagreement between the prompts is the uncertainty. All
boxes go through the decoder in one batch against the one cached image embedding, so N = 20 boxes
cost about as much as a few single-box calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medfm.prompts import Box, jitter_box
from medfm.segment.predictor import Predictor

#: SAM-U uses 20 jittered boxes per target.
DEFAULT_BOX_COUNT = 20


@dataclass
class UncertainPrediction:
    """Mean-probability mask with its uncertainty.

    ``probability`` (H, W) is the mean of the prompts' sigmoid probabilities, ``mask`` is
    ``probability > 0.5``, ``entropy`` (H, W) is the binary entropy of the mean probability (bits,
    0..1) and ``variance`` (H, W) the variance of the prompts' probabilities.
    """

    probability: np.ndarray
    mask: np.ndarray
    entropy: np.ndarray
    variance: np.ndarray
    boxes: list[Box]


def sam_u_boxes(box: Box, height: int, width: int, *, count: int = DEFAULT_BOX_COUNT, max_shift: float | None = None,
                seed: int = 0) -> list[Box]:
    """``count`` boxes whose sides move independently by up to ``max_shift`` pixels either way
    (default: `default_shift`), the first being the box itself; within the image, never inverted."""
    rng = np.random.default_rng(seed)
    shift = default_shift(box) if max_shift is None else max_shift
    return [box] + [jitter_box(box, rng, shift, shift, height=height, width=width, whole_pixels=False)
                    for _ in range(count - 1)]


def binary_entropy(probability: np.ndarray) -> np.ndarray:
    """Entropy in bits of a Bernoulli probability map (0 where certain, 1 at p = 0.5)."""
    p = np.clip(probability, 1e-7, 1 - 1e-7)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def predict_with_uncertainty(predictor: Predictor, boxes: Sequence[Box]) -> UncertainPrediction:
    """Prompt the cached image with every box at once and summarise their agreement."""
    prediction = predictor.predict(boxes=list(boxes))
    probabilities = 1.0 / (1.0 + np.exp(-prediction.logits.astype(np.float64)))
    mean = probabilities.mean(axis=0)
    return UncertainPrediction(
        probability=mean.astype(np.float32),
        mask=mean > 0.5,
        entropy=binary_entropy(mean).astype(np.float32),
        variance=probabilities.var(axis=0).astype(np.float32),
        boxes=list(boxes),
    )


def default_shift(box: Box) -> float:
    """Jitter amplitude: 10% of the box's longer side, at least 3 pixels."""
    return max(3.0, 0.1 * max(box.x1 - box.x0, box.y1 - box.y0))


def error_detection_auc(uncertainty: np.ndarray, mask: np.ndarray, reference: np.ndarray, region: np.ndarray | None = None) -> float:
    """Area under the ROC curve of the uncertainty map for telling wrong pixels from right ones.

    Computed over ``region`` (e.g. the union of the prompt boxes, where the model had to decide);
    NaN when the region holds only right or only wrong pixels (the AUC is undefined there).
    """
    region = np.ones(mask.shape, bool) if region is None else region
    wrong = (mask != reference.astype(bool))[region]
    scores = uncertainty[region].astype(np.float64)
    positives, negatives = int(wrong.sum()), int((~wrong).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(scores)  # ties get their average rank: the Mann-Whitney form of the AUC
    return float((ranks[wrong].sum() - positives * (positives + 1) / 2) / (positives * negatives))
