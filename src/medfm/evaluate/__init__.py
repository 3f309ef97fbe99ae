"""Evaluation: spacing-aware segmentation metrics (Dice, IoU, NSD, HD95) with defined empty cases."""

from medfm.evaluate.metrics import (
    dice,
    hausdorff95,
    iou,
    normalized_surface_dice,
    segmentation_metrics,
)

__all__ = [
    "dice",
    "hausdorff95",
    "iou",
    "normalized_surface_dice",
    "segmentation_metrics",
]
