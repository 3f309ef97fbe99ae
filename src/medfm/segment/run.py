"""One-call segmentation of a file or image: what ``medfm segment`` and the server call.

``segment`` reads the input, runs the predictor on the requested slice with every box as its own
prompt (one label each), and returns the label map on the input's full grid: for a volume, the
whole volume with only the segmented slice filled, so that it is written with the same affine.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike

import numpy as np

from medfm.errors import PromptError
from medfm.intensity import IntensityPreset
from medfm.io import MedicalImage, read_image
from medfm.preprocess import to_uint8_rgb
from medfm.prompts import Box, Points
from medfm.segment.model import SegmentationModel, load
from medfm.segment.predictor import Prediction, Predictor
from medfm.segment.uncertainty import DEFAULT_BOX_COUNT, default_shift, jitter_box, predict_with_uncertainty


@dataclass
class SegmentationResult:
    """The label map on the input grid, the raw prediction of the slice, and timings (seconds)."""

    image: MedicalImage
    label_map: np.ndarray
    prediction: Prediction
    slice_index: int | None
    encode_seconds: float
    decode_seconds: float
    #: SAM-U entropy (bits, 0..1) on the same grid as ``label_map``, when asked for.
    uncertainty: np.ndarray | None = None


def segment(
    image: MedicalImage | str | PathLike[str],
    boxes: Sequence[Box] = (),
    points: Points | None = None,
    *,
    slice_index: int | None = None,
    model: SegmentationModel | str | None = None,
    intensity: IntensityPreset | None = None,
    uncertainty: bool = False,
    precision: str = "fp32",
) -> SegmentationResult:
    """Segment one 2D image or one slice of a volume from boxes and/or clicks.

    Each box is one prompt and one label (1, 2, ...); clicks refine a single box, or form one
    prompt on their own when no box is given. With ``uncertainty`` each box is also prompted as
    SAM-U's 20 jittered boxes and the result carries the per-pixel entropy (the maximum over boxes).
    ``precision="bf16"`` runs the optimised engine in bfloat16 (faster on CPUs that have it; a few
    boundary pixels may differ from fp32).
    """
    image = image if isinstance(image, MedicalImage) else read_image(image)
    model = model if isinstance(model, SegmentationModel) else load(model)
    check_prompts(boxes, points)
    if image.modality is None and intensity is None and image.array.dtype != np.uint8:
        warnings.warn(
            f"{image.path or 'image'}: modality unknown, so intensities are min-max scaled; "
            "name the modality (e.g. CT for HU windows) for the intended contrast",
            stacklevel=2,
        )
    predictor = model.predictor(precision=precision)
    started = time.perf_counter()
    predictor.set_image(image, slice_index=slice_index, intensity=intensity)
    encoded = time.perf_counter()
    prediction = predict_prompts(predictor, boxes, points)
    decoded = time.perf_counter()
    entropy = None
    if uncertainty:
        if not boxes:
            raise PromptError("uncertainty (SAM-U) needs box prompts")
        height, width = prediction.masks.shape[1:]
        entropy = np.max([
            predict_with_uncertainty(predictor, jitter_box(box, DEFAULT_BOX_COUNT, default_shift(box), height, width, seed=i)).entropy
            for i, box in enumerate(boxes)
        ], axis=0)
    labels = label_map_on_grid(prediction, image, slice_index)
    if image.is_volume and entropy is not None:
        entropy = _on_volume(entropy, image, slice_index)
    return SegmentationResult(image, labels, prediction, slice_index, encoded - started, decoded - encoded, entropy)


def check_prompts(boxes: Sequence[Box], points: Points | None) -> None:
    """Raise `PromptError` unless the boxes and clicks form prompts `segment` can answer."""
    if not boxes and points is None:
        raise PromptError("give at least one box or point")
    if len(boxes) > 1 and points is not None:
        raise PromptError("clicks refine one box: give a single box with points, or boxes alone")


def predict_prompts(predictor: Predictor, boxes: Sequence[Box], points: Points | None) -> Prediction:
    """Each box one prompt (clicks refine the single box, or are one prompt alone) on the image the
    predictor holds: the decoder only, so many calls share one encoded image."""
    return predictor.predict(
        boxes=list(boxes) or None,
        points=None if points is None else points.coords[None],
        point_labels=None if points is None else points.labels[None],
    )


def label_map_on_grid(prediction: Prediction, image: MedicalImage, slice_index: int | None) -> np.ndarray:
    """One label per prompt on the input's full grid (a volume's slice placed in the whole volume)."""
    labels = prediction.label_map()
    return _on_volume(labels, image, slice_index) if image.is_volume else labels


def _on_volume(plane: np.ndarray, image: MedicalImage, slice_index: int) -> np.ndarray:
    """A slice result placed on the whole volume grid (zeros elsewhere), to keep the input's geometry."""
    full = np.zeros(image.spatial_shape, dtype=plane.dtype)
    full[slice_index] = plane
    return full


def overlay(
    result: SegmentationResult,
    boxes: Sequence[Box] = (),
    points: Points | None = None,
    intensity: IntensityPreset | None = None,
) -> np.ndarray:
    """An RGB uint8 picture of the segmented image with masks, boxes and clicks drawn on it."""
    from PIL import Image, ImageDraw

    array = result.image.array if result.slice_index is None else result.image.array[result.slice_index]
    labels = result.label_map if result.slice_index is None else result.label_map[result.slice_index]
    rgb = to_uint8_rgb(array, intensity, result.image.modality).astype(np.float32)
    palette = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180]])
    for label in np.unique(labels[labels > 0]):
        colour = palette[(label - 1) % len(palette)]
        inside = labels == label
        rgb[inside] = 0.55 * rgb[inside] + 0.45 * colour
    picture = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for index, box in enumerate(boxes):
        draw.rectangle([box.x0, box.y0, box.x1, box.y1], outline=tuple(int(c) for c in palette[index % len(palette)]), width=2)
    if points is not None:
        for (x, y), label in zip(points.coords, points.labels):
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(0, 255, 0) if label else (255, 0, 0), outline=(0, 0, 0))
    return np.asarray(picture)


def dice_per_label(prediction: np.ndarray, reference: np.ndarray, labels: Sequence[int] | None = None) -> dict[int, float]:
    """Dice of each label (default: every foreground label of either map) against the same label in
    the reference; both empty counts as 1.0."""
    scores = {}
    if labels is None:
        labels = sorted((set(np.unique(prediction)) | set(np.unique(reference))) - {0})
    for label in labels:
        ours, theirs = prediction == label, reference == label
        total = ours.sum() + theirs.sum()
        scores[int(label)] = 1.0 if total == 0 else float(2 * (ours & theirs).sum() / total)
    return scores
