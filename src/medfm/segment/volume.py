"""3D segmentation from a 3D box with a 2D promptable model, slice by slice with propagation.

This is how LiteMedSAM and the CVPR 2024 "MedSAM on Laptop" challenge segment CT and MR volumes:
the start slice (the middle of the box's z-range, or the slice where a reference label is largest)
is segmented from its 2D box; the mask then propagates outwards, each next slice prompted by the
box of the previous slice's mask, enlarged by a small margin and kept inside the 3D box, until
the z-range ends or the mask vanishes. Intensities are normalised once per volume. Slices are
encoded lazily in batches along the propagation direction, so slices the propagation never
reaches are never encoded, and every slice is encoded at most once for all labels.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from medfm.errors import PromptError
from medfm.intensity import IntensityPreset
from medfm.io import MedicalImage
from medfm.preprocess import Geometry
from medfm.progress import progress_bar
from medfm.prompts import Box, Box3D
from medfm.segment.predictor import Predictor


@dataclass(frozen=True)
class VolumePrompt:
    """One structure to segment: its 3D box, the label it gets, and optionally where to start."""

    box: Box3D
    label: int
    start_slice: int | None = None
    start_box: Box | None = None


@dataclass
class VolumeSegmentation:
    """The label map on the volume's grid and what it took to get it."""

    label_map: np.ndarray
    slices: dict[int, list[int]] = field(default_factory=dict)
    encoded_slices: int = 0
    seconds: float = 0.0


def prompts_from_labels(labels: np.ndarray) -> list[VolumePrompt]:
    """One prompt per label of a coarse label map: its 3D box, starting on its largest slice."""
    prompts = []
    for label in (int(v) for v in np.unique(labels) if v != 0):
        mask = labels == label
        start = int(np.argmax(mask.sum(axis=(1, 2))))
        prompts.append(VolumePrompt(Box3D.from_mask(mask), label, start, Box.from_mask(mask[start])))
    if not prompts:
        raise PromptError("the label map has no foreground label to take boxes from")
    return prompts


class _EmbeddingCache:
    """Slice embeddings of one volume, encoded lazily in batches ahead of the propagation."""

    def __init__(self, predictor: Predictor, image: MedicalImage, intensity: IntensityPreset | None, batch_size: int):
        self.predictor, self.image, self.intensity, self.batch_size = predictor, image, intensity, batch_size
        self.entries: dict[int, tuple[torch.Tensor, Geometry]] = {}

    def use(self, index: int, step: int, last: int) -> None:
        """Make slice ``index`` current, encoding it and the next slices towards ``last`` if needed."""
        if index not in self.entries:
            ahead = [z for z in range(index, last + step, step) if z not in self.entries][: self.batch_size]
            for z, embedding, geometry in self.predictor.encode_slices(self.image, ahead, self.intensity, self.batch_size):
                self.entries[z] = (embedding, geometry)
        self.predictor.use_embedding(*self.entries[index])


def segment_volume(
    predictor: Predictor,
    image: MedicalImage,
    prompts: Iterable[Box3D | VolumePrompt],
    *,
    intensity: IntensityPreset | None = None,
    margin: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> VolumeSegmentation:
    """Segment each 3D box of a volume (labels 1, 2, ... in order, unless `VolumePrompt` says).

    ``margin`` (input pixels) enlarges the box taken from the previous slice's mask; by default it
    is 3 pixels of the model's 256-pixel frame, as LiteMedSAM's inference does.
    """
    if not image.is_volume:
        raise PromptError(f"{image.path or 'the image'} is not a volume; 3D boxes need a (Z, Y, X) image")
    prompts = [p if isinstance(p, VolumePrompt) else VolumePrompt(p, label) for label, p in enumerate(prompts, start=1)]
    if not prompts:
        raise PromptError("no 3D box given")
    depth, height, width = image.spatial_shape
    for prompt in prompts:
        prompt.box.check_inside((depth, height, width))
    margin = max(2, round(3 * max(height, width) / 256)) if margin is None else margin
    started = time.perf_counter()
    cache = _EmbeddingCache(predictor, image, intensity, batch_size)
    labels = np.zeros(image.spatial_shape, dtype=np.uint8 if max(p.label for p in prompts) < 256 else np.uint16)
    best = np.full(image.spatial_shape, -np.inf, dtype=np.float32)
    result = VolumeSegmentation(labels)
    total = sum(p.box.z1 - p.box.z0 + 1 for p in prompts)
    with progress_bar(progress, total, "segmenting slices") as advance:
        for prompt in prompts:
            segmented = _propagate(predictor, cache, prompt, margin, labels, best, advance)
            result.slices[prompt.label] = sorted(segmented)
    result.encoded_slices = len(cache.entries)
    result.seconds = time.perf_counter() - started
    return result


def _propagate(predictor, cache, prompt, margin, labels, best, advance) -> list[int]:  # noqa: ANN001
    """Segment one structure from its start slice outwards; returns the slices it covered."""
    box = prompt.box
    start = prompt.start_slice if prompt.start_slice is not None else (box.z0 + box.z1) // 2
    if not box.z0 <= start <= box.z1:
        raise PromptError(f"start slice {start} lies outside the box's z-range {box.z0}..{box.z1}")

    def segment_slice(z: int, step: int, last: int, prompt_box: Box) -> np.ndarray:
        cache.use(z, step, last)
        prediction = predictor.predict(boxes=[prompt_box])
        mask, logits = prediction.masks[0], prediction.logits[0]
        wins = mask & (logits > best[z])  # where structures overlap, the more confident one wins
        labels[z][wins], best[z][wins] = prompt.label, logits[wins]
        advance()
        return mask

    start_mask = segment_slice(start, 1, box.z1, prompt.start_box or box.box2d())
    segmented = [start]
    for step, last in ((1, box.z1), (-1, box.z0)):
        previous, z = start_mask, start + step
        while (last - z) * step >= 0 and previous.any():  # stop at the z-range's end or when the mask vanishes
            previous = segment_slice(z, step, last, _grown_box(previous, margin, box))
            segmented.append(z)
            z += step
    return segmented


def _grown_box(mask: np.ndarray, margin: int, limit: Box3D) -> Box:
    """The previous slice's mask box, enlarged by ``margin`` and kept inside the 3D box."""
    tight = Box.from_mask(mask)
    return Box(
        max(tight.x0 - margin, limit.x0), max(tight.y0 - margin, limit.y0),
        min(tight.x1 + margin, limit.x1), min(tight.y1 + margin, limit.y1),
    )


__all__: Sequence[str] = ["VolumePrompt", "VolumeSegmentation", "prompts_from_labels", "segment_volume"]
