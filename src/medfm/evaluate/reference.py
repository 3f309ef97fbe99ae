"""A segmentation scored against a reference mask: what ``medfm segment --reference`` prints.

Each output label is matched to the reference structure its prompt outlines and scored with the
one Dice of `medfm.evaluate.metrics` (both empty 1.0, one empty 0.0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medfm.evaluate.metrics import dice
from medfm.prompts import Box
from medfm.segment.run import SegmentOutcome


@dataclass(frozen=True)
class ReferenceScore:
    """The Dice of one output label (None: every label together) against one reference value
    (None: the reference's whole foreground, or no label of the reference at the prompt)."""

    label: int | None
    reference_label: int | None
    dice: float


def score_outcome(outcome: SegmentOutcome) -> list[ReferenceScore]:
    """The scores of a `run_request` outcome against the reference it read (empty without one)."""
    if outcome.comparison is None:
        return []
    return compare_with_reference(outcome.comparison.label_map, outcome.comparison.reference, outcome.comparison.prompts)


def compare_with_reference(
    label_map: np.ndarray, reference: np.ndarray, prompts: Mapping[int, tuple[int | None, Box] | None],
) -> list[ReferenceScore]:
    """Dice of each output label against the reference structure it prompts, matched by value.

    ``prompts`` maps each output label to (the slice its 2D box lies on or None, the box), or to
    None for a label taken from a label map (``--boxes-from``). A reference with one foreground
    value is compared foreground against foreground (a binary 0/1 or 0/255 mask). With several
    values, a label from a label map is compared with the same value; a label from a box with the reference
    value whose bounding box on that slice overlaps the prompt's box most (IoU), so a liver box
    is scored against the liver whatever number the reference gives it.
    """
    values = [int(v) for v in np.unique(reference) if v != 0]
    if len(values) <= 1:
        return [ReferenceScore(None, values[0] if values else None, dice(label_map > 0, reference != 0))]
    scores = []
    for label, prompt in prompts.items():
        if prompt is None:
            matched = label if label in values else None
        else:
            slice_index, box = prompt
            matched = _best_overlap(reference if slice_index is None else reference[slice_index], box, values)
        truth = reference == matched if matched is not None else np.zeros(reference.shape, bool)
        scores.append(ReferenceScore(label, matched, dice(label_map == label, truth)))
    return scores


def _best_overlap(reference: np.ndarray, box: Box, values: Sequence[int]) -> int | None:
    """The reference value whose bounding box has the highest IoU with ``box`` (None: none overlaps)."""
    best, best_iou = None, 0.0
    for value in values:
        if not (reference == value).any():
            continue
        theirs = Box.from_mask(reference == value)
        width = min(box.x1, theirs.x1) - max(box.x0, theirs.x0) + 1
        height = min(box.y1, theirs.y1) - max(box.y0, theirs.y0) + 1
        if width <= 0 or height <= 0:
            continue
        area = lambda b: (b.x1 - b.x0 + 1) * (b.y1 - b.y0 + 1)  # noqa: E731 - corners inclusive
        iou = width * height / (area(box) + area(theirs) - width * height)
        if iou > best_iou:
            best, best_iou = value, iou
    return best
