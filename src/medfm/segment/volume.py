"""3D segmentation from a 3D box with a 2D promptable model, slice by slice with propagation.

This is how LiteMedSAM and the CVPR 2024 "MedSAM on Laptop" challenge segment CT and MR volumes:
the start slice (the middle of the box's z-range, or the slice where a reference label is largest)
is segmented from its 2D box; the mask then propagates outwards, each next slice prompted by the
box of the previous slice's mask, enlarged by a small margin and kept inside the 3D box, until
the z-range ends or the mask vanishes. Intensities are normalised once per volume. Slices are
encoded lazily along the propagation direction, so slices the propagation never reaches are never
encoded, and every slice is encoded at most once for all labels.

With ``slice_step=k > 1`` only key slices are segmented by the model (start, start +- k, ... and
always the last slice of the z-range in each direction); the slices between two key slices get the
linear interpolation of the two key slices' logits, so the image encoder, which dominates the time,
runs on about one slice in k.

With ``refine_below=d`` as well, the step adapts to the structure: wherever two neighbouring key
slices' masks overlap with a Dice below ``d``, the slice midway between them is segmented by the
model too, recursively, so slices are spent where the shape changes (and where it ends) rather
than evenly.
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
from medfm.segment.options import check_refine_below, check_slice_step
from medfm.segment.predictor import Predictor
from medfm.segment.request import check_has_contrast


@dataclass(frozen=True)
class VolumePrompt:
    """One structure to segment: its 3D box, the label it gets, and optionally where to start."""

    box: Box3D
    label: int
    start_slice: int | None = None
    start_box: Box | None = None


@dataclass
class VolumeSegmentation:
    """The label map on the volume's grid and what it took to get it.

    ``slices[label]``: every slice that got a mask value for the label, key and interpolated
    (including a key slice where the mask vanished); ``key_slices[label]``: those the model
    segmented itself (all of ``slices`` when ``slice_step`` is 1); ``encoded_slices``: slices
    encoded for all labels together (with ``batch_size > 1`` it includes look-ahead ones the
    propagation then did not reach).
    """

    label_map: np.ndarray
    slices: dict[int, list[int]] = field(default_factory=dict)
    key_slices: dict[int, list[int]] = field(default_factory=dict)
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
    """Slice embeddings of one volume, encoded lazily in batches ahead of the propagation.

    Only the slices the propagation segments with the model (the key slices) are ever encoded."""

    def __init__(self, predictor: Predictor, image: MedicalImage, intensity: IntensityPreset | None, batch_size: int):
        self.predictor, self.image, self.intensity, self.batch_size = predictor, image, intensity, batch_size
        self.entries: dict[int, tuple[torch.Tensor, Geometry]] = {}

    def use(self, index: int, step: int, last: int) -> None:
        """Make slice ``index`` current, encoding it and the next key slices towards ``last`` (every
        ``step``-th, and ``last`` itself; ``step`` is signed) if needed."""
        if index not in self.entries:
            ahead = [z for z in _key_slices(index, step, last) if z not in self.entries][: self.batch_size]
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
    slice_step: int = 1,
    refine_below: float | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> VolumeSegmentation:
    """Segment each 3D box of a volume (labels 1, 2, ... in order, unless `VolumePrompt` says).

    ``margin`` (input pixels) enlarges the box taken from the previous slice's mask; by default it
    is 3 pixels of the model's 256-pixel frame, as LiteMedSAM's inference does.

    ``slice_step=k`` segments only every k-th slice from the start slice with the model, plus the
    last slice of the z-range in each direction, and interpolates the logits linearly in between:
    about k times faster, at the cost of detail that changes within k slices (thin or fast-moving
    structures). A key slice's box is the previous key slice's mask box enlarged by ``margin``
    times the distance between them, since a boundary can move about ``margin`` per slice. Where
    the mask vanishes at a key slice, the slices before it shrink towards it by interpolation and
    propagation stops there. 1 (the default) segments every slice.

    ``refine_below`` (a Dice in (0, 1], with ``slice_step > 1``): where two neighbouring key slices'
    masks overlap less than this, the middle slice between them is segmented by the model as well
    (prompted by the box of the interpolated mask there, enlarged by ``margin``), and so on
    until neighbouring keys agree or are adjacent: an adaptive step that spends the encoder where
    the structure changes quickly or ends. None (the default) keeps the even step.

    ``batch_size`` slices are encoded per encoder call; the default 1 is fastest on CPUs, where
    batching made each image slower (benchmarks/volume_speed.py --batch-size, fp32, step 4: 0.66 s
    per encoded slice at batch 1, 0.84 s at batch 4).
    """
    check_slice_step(slice_step)
    check_refine_below(refine_below, slice_step)
    if not image.is_volume:
        raise PromptError(f"{image.path or 'the image'} is not a volume; 3D boxes need a (Z, Y, X) image")
    check_has_contrast(image)
    prompts = list(prompts)
    for prompt in prompts:
        if isinstance(prompt, Box3D):  # a user's box; a `VolumePrompt` from a label map may be one voxel wide
            prompt.box2d().check_area()
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
            segmented, keys = _propagate(predictor, cache, prompt, margin, slice_step, refine_below, labels, best, advance)
            result.slices[prompt.label], result.key_slices[prompt.label] = sorted(segmented), sorted(keys)
    result.encoded_slices = len(cache.entries)
    result.seconds = time.perf_counter() - started
    return result


def _propagate(predictor, cache, prompt, margin, slice_step, refine_below, labels, best, advance) -> tuple[list[int], list[int]]:  # noqa: ANN001
    """Segment one structure from its start slice outwards, key slice by key slice, filling the
    slices between; returns the slices it covered and the key slices among them."""
    box = prompt.box
    start = prompt.start_slice if prompt.start_slice is not None else (box.z0 + box.z1) // 2
    if not box.z0 <= start <= box.z1:
        raise PromptError(f"start slice {start} lies outside the box's z-range {box.z0}..{box.z1}")
    threshold = predictor.model.preprocess.mask_threshold

    def label_slice(z: int, mask: np.ndarray, logits: np.ndarray) -> None:
        wins = mask & (logits > best[z])  # where structures overlap, the more confident one wins
        labels[z][wins], best[z][wins] = prompt.label, logits[wins]
        advance()

    def segment_key(z: int, step: int, last: int, prompt_box: Box) -> tuple[np.ndarray, np.ndarray]:
        cache.use(z, step, last)
        prediction = predictor.predict(boxes=[prompt_box])
        label_slice(z, prediction.masks[0], prediction.logits[0])
        return prediction.masks[0], prediction.logits[0]

    def fill_between(a: tuple[int, np.ndarray, np.ndarray], b: tuple[int, np.ndarray, np.ndarray]) -> list[int]:
        """Fill the slices strictly between key slices ``a`` and ``b`` ((z, mask, logits) each):
        by interpolation, or, where their masks disagree, by segmenting the middle slice and
        filling each half. Returns the key slices it added."""
        (za, mask_a, logits_a), (zb, mask_b, logits_b) = a, b
        distance = abs(zb - za)
        if distance < 2:
            return []
        if refine_below is not None and _dice(mask_a, mask_b) < refine_below:
            half = distance // 2
            middle = za + half * (1 if zb > za else -1)
            t = half / distance  # prompted like a step-1 slice: the box of the interpolated mask there, plus margin
            guess = (1 - t) * logits_a + t * logits_b > threshold
            prompt_box = _grown_box(guess if guess.any() else mask_a | mask_b, margin, box)
            middle_mask, middle_logits = segment_key(middle, 1, middle, prompt_box)
            m = (middle, middle_mask, middle_logits)
            return [middle, *fill_between(a, m), *fill_between(m, b)]
        for offset in range(1, distance):
            t = offset / distance
            between = (1 - t) * logits_a + t * logits_b
            label_slice(za + (offset if zb > za else -offset), between > threshold, between)
        return []

    start_mask, start_logits = segment_key(start, slice_step, box.z1, prompt.start_box or box.box2d())
    segmented, keys = [start], [start]
    for direction, last in ((1, box.z1), (-1, box.z0)):
        previous = (start, start_mask, start_logits)  # the previous key slice: all that is held
        while previous[0] != last and previous[1].any():  # stop at the z-range's end or when the mask vanishes
            z, mask, _ = previous
            distance = min(slice_step, abs(last - z))
            key = z + direction * distance
            key_mask, key_logits = segment_key(key, direction * slice_step, last, _grown_box(mask, margin * distance, box))
            following = (key, key_mask, key_logits)
            keys += [key, *fill_between(previous, following)]
            segmented += [z + direction * offset for offset in range(1, distance + 1)]
            previous = following
    return segmented, keys


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _grown_box(mask: np.ndarray, margin: int, limit: Box3D) -> Box:
    """The previous slice's mask box, enlarged by ``margin`` and kept inside the 3D box."""
    tight = Box.from_mask(mask)
    return Box(
        max(tight.x0 - margin, limit.x0), max(tight.y0 - margin, limit.y0),
        min(tight.x1 + margin, limit.x1), min(tight.y1 + margin, limit.y1),
    )


def _key_slices(first: int, step: int, last: int) -> list[int]:
    """Key slices from ``first`` towards ``last``: every ``step``-th (signed), then ``last`` itself."""
    return [*range(first, last, step), last]


__all__: Sequence[str] = ["VolumePrompt", "VolumeSegmentation", "check_refine_below", "check_slice_step", "prompts_from_labels", "segment_volume"]
