"""Training samples: 2D images and foreground slices of 3D volumes, augmented, with prompts simulated
on the fly.

One sample is one 2D image (or one slice with foreground of a volume) and one target: a foreground
label drawn at random (or, for prompt-free training, all foreground labels merged). Per sample:
``to_uint8_rgb`` -> flips, a small rotation and scaling (image bilinear, mask nearest) -> brightness
and contrast jitter -> the model's own preprocessing (`medfm.preprocess.prepare`). The target comes
as a mask on the low-res logit grid (4E x 4E, the model-input frame scaled down), the prompts in the
model-input frame: a box jittered outwards by up to ``box_jitter`` pixels per side and inwards by up
to half of that, and one click on the target.

Randomness comes from ``numpy.random.default_rng([seed, epoch, index])``: a sample is the same
whatever the worker, process or resume point that makes it.

With ``robust`` options (training without a cache) each sample also gets, on its full-resolution
image, a slight Gaussian blur and a gamma change now and then, and is resized to the model input
with a kernel drawn from `ROBUST_KERNELS` (the ones users' pipelines apply) instead of the
checkpoint's own, so that the trained model stops depending on the resize filter. Samples carry up
to `MAX_CLICKS` simulated clicks for mixed-prompt training: the first positive, on the target's
centre-most pixel or a random target pixel, the others positive on the target or negative next to
it, at random.

With an `EmbeddingCache` (recipes with a frozen image encoder) images are encoded once, without
augmentation; the samples then carry the cached embedding instead of pixels, and only the prompts
change from epoch to epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from medfm.errors import InputFileError
from medfm.prompts import Box, jitter_box
from medfm.data.datasets import Case
from medfm.io import read_image
from medfm.preprocess import PreprocessConfig, prepare, resized_shape, to_uint8_rgb


#: resize kernels of `medfm.preprocess` that robust training draws from, one per sample: OpenCV's
#: INTER_AREA (LiteMedSAM), bilinear and bicubic without antialiasing, torch's antialiased bilinear
ROBUST_KERNELS = ("area", "bilinear", "bicubic", "torch-bilinear-aa")
#: clicks a sample carries for mixed-prompt training
MAX_CLICKS = 5
#: negative clicks fall in the target's box grown by this share of its size on each side
NEGATIVE_MARGIN = 0.1


@dataclass(frozen=True)
class SampleRef:
    """One training sample: a case and, for a volume, the slice (along Z)."""

    case: Case
    slice_index: int | None


@dataclass(frozen=True)
class SampleOptions:
    """How samples are made."""

    train: bool = True  #: False: validation samples (no augmentation, tight boxes, centre clicks)
    augment: bool = True  #: image-space augmentation (training without an embedding cache only)
    box_jitter: int = 5  #: model-input pixels
    foreground: bool = False  #: merge all labels into one target (prompt-free recipes)
    robust: bool = False  #: with ``augment``: random resize kernel, slight blur and gamma (see the module docstring)


def _read_pair(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 RGB image (H, W, 3) or volume (Z, H, W, 3) of a case and its label map."""
    image = read_image(case.image_path, modality=case.modality)
    labels = np.asarray(read_image(case.mask_path).array)
    if labels.ndim == image.array.ndim and labels.ndim == 3 and not image.is_volume and labels.shape[-1] in (3, 4):
        labels = labels[..., 0]
    if labels.shape != image.spatial_shape:
        raise InputFileError(case.mask_path, f"mask shape {labels.shape} differs from the image's {image.spatial_shape}")
    return to_uint8_rgb(image.array, None, image.modality), labels.astype(np.int32)


def sample_refs(cases: Sequence[Case], slices_per_volume: int | None = None) -> list[SampleRef]:
    """Every 2D case with foreground, and the foreground slices of every volume (at most
    ``slices_per_volume`` of them, evenly spaced)."""
    refs = []
    for case in cases:
        labels = np.asarray(read_image(case.mask_path).array)
        if not case.is_volume:
            if labels.any():
                refs.append(SampleRef(case, None))
            continue
        slices = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
        if slices_per_volume is not None and len(slices) > slices_per_volume:
            slices = slices[np.linspace(0, len(slices) - 1, slices_per_volume).round().astype(int)]
        refs.extend(SampleRef(case, int(z)) for z in slices)
    return refs


def augment(rgb: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flips, rotation within +-10 degrees, scaling by 0.9-1.1 (labels nearest), brightness and contrast jitter."""
    if rng.random() < 0.5:
        rgb, labels = rgb[:, ::-1], labels[:, ::-1]
    if rng.random() < 0.5:
        rgb, labels = rgb[::-1], labels[::-1]
    height, width = labels.shape
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), rng.uniform(-10, 10), rng.uniform(0.9, 1.1))
    rgb = cv2.warpAffine(np.ascontiguousarray(rgb), matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=0)
    moved = cv2.warpAffine(np.ascontiguousarray(labels).astype(np.float32), matrix, (width, height),
                           flags=cv2.INTER_NEAREST, borderValue=0)
    contrast, brightness = rng.uniform(0.9, 1.1), rng.uniform(-12.0, 12.0)
    rgb = np.clip(rgb.astype(np.float32) * contrast + brightness, 0, 255).astype(np.uint8)
    return rgb, moved.astype(np.int32)


def degrade(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What scanners, exports and viewers do to an image: a slight Gaussian blur (a third of the
    samples, sigma 0.3-1.2 input pixels) and a gamma change (half of them, 0.7-1.4), on the
    full-resolution uint8 image."""
    if rng.random() < 0.33:
        rgb = cv2.GaussianBlur(np.ascontiguousarray(rgb), (0, 0), rng.uniform(0.3, 1.2))
    if rng.random() < 0.5:
        table = np.round(255.0 * (np.arange(256) / 255.0) ** rng.uniform(0.7, 1.4)).astype(np.uint8)
        rgb = cv2.LUT(np.ascontiguousarray(rgb), table)
    return rgb


def low_res_target(target: np.ndarray, preprocess: PreprocessConfig, low: int) -> np.ndarray:
    """A binary (H, W) mask on the input grid -> float32 (low, low) in the model-input frame (padding 0)."""
    new_h, new_w = resized_shape(target.shape, preprocess)
    size = (max(1, round(new_w * low / preprocess.image_size)), max(1, round(new_h * low / preprocess.image_size)))
    resized = cv2.resize(target.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    frame = np.zeros((low, low), dtype=np.float32)
    frame[: size[1], : size[0]] = resized >= 0.5
    return frame


def jittered_box(target_low: np.ndarray, image_size: int, jitter: int, rng: np.random.Generator | None) -> np.ndarray:
    """The target's box in model-input pixels, each side moved outwards by up to ``jitter`` and
    inwards by up to ``jitter // 2`` (never inverted); the tight box when ``rng`` is None."""
    scale = image_size / target_low.shape[0]
    rows, cols = np.nonzero(target_low)
    box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float64) * scale
    box[2:] -= 1
    if rng is not None and jitter > 0:
        box = jitter_box(Box(*box), rng, jitter, jitter // 2, height=image_size, width=image_size).as_array()
    return box.astype(np.float32)


def click(target_low: np.ndarray, image_size: int, rng: np.random.Generator | None) -> np.ndarray:
    """One positive click (x, y) in model-input pixels: a random target pixel, or with no ``rng``
    the target's centre-most pixel."""
    from scipy import ndimage

    if rng is None:
        distance = ndimage.distance_transform_edt(np.pad(target_low, 1))[1:-1, 1:-1]
        row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    else:
        rows, cols = np.nonzero(target_low)
        pick = int(rng.integers(len(rows)))
        row, col = rows[pick], cols[pick]
    scale = image_size / target_low.shape[0]
    return np.array([(col + 0.5) * scale, (row + 0.5) * scale], dtype=np.float32)


def clicks(target_low: np.ndarray, image_size: int, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """`MAX_CLICKS` clicks in model-input pixels -> (coords (K, 2) as x, y; labels (K,), 1 positive,
    0 negative). The first is positive: `click` (centre-most for half the training samples and for
    validation). Each other is, at even odds, a random target pixel or a random non-target pixel of
    the target's box grown by `NEGATIVE_MARGIN` (a positive when that box holds none); validation
    samples take positives only."""
    first = click(target_low, image_size, rng if rng is not None and rng.random() < 0.5 else None)
    coords, labels = [first], [1]
    rows, cols = np.nonzero(target_low)
    side = target_low.shape[0]
    margin = (NEGATIVE_MARGIN * (rows.max() - rows.min() + 1), NEGATIVE_MARGIN * (cols.max() - cols.min() + 1))
    r0, c0 = max(0, int(rows.min() - margin[0])), max(0, int(cols.min() - margin[1]))
    r1, c1 = min(side, int(np.ceil(rows.max() + 1 + margin[0]))), min(side, int(np.ceil(cols.max() + 1 + margin[1])))
    outside = np.argwhere(target_low[r0:r1, c0:c1] == 0) + (r0, c0)
    scale = image_size / side
    draw = rng or np.random.default_rng(0)
    for _ in range(MAX_CLICKS - 1):
        if rng is not None and len(outside) and draw.random() < 0.5:
            (row, col), label = outside[draw.integers(len(outside))], 0
        else:
            pick = draw.integers(len(rows))
            (row, col), label = (rows[pick], cols[pick]), 1
        coords.append(np.array([(col + 0.5) * scale, (row + 0.5) * scale], dtype=np.float32))
        labels.append(label)
    return np.stack(coords).astype(np.float32), np.array(labels, dtype=np.int64)


class EmbeddingCache:
    """Image embeddings of a frozen encoder, one fp16 safetensors file per sample in ``folder``,
    with the sample's label map; keyed by the model's identity, the contents of the image and mask
    files, the slice and the preprocessing, so a folder can serve several runs, and a data set
    copied or unpacked again (new paths, new times) still finds its entries."""

    def __init__(self, folder: Path, model_id: str, preprocess: PreprocessConfig) -> None:
        self.folder = Path(folder)
        self.model_id = model_id
        self.preprocess = preprocess
        self._digests: dict[tuple[Path, int, int], str] = {}

    def _digest(self, path: Path) -> str:
        """SHA-256 of a file's bytes, once per file (size and mtime) in this process."""
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            with path.open("rb") as handle:
                self._digests[key] = hashlib.file_digest(handle, "sha256").hexdigest()
        return self._digests[key]

    def path(self, ref: SampleRef) -> Path:
        key = json.dumps([self.model_id, self._digest(ref.case.image_path), self._digest(ref.case.mask_path),
                          ref.slice_index, self.preprocess.to_dict()])
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def fill(self, refs: Sequence[SampleRef], encode: Callable[[Tensor], Tensor], batch_size: int = 4,
             advance: Callable[[], None] = lambda: None) -> None:
        """Encode the samples not cached yet (``encode``: pixels (B, 3, S, S) -> (B, C, E, E))."""
        from safetensors.torch import save_file

        from medfm.io.writers import atomic_path

        missing = [ref for ref in refs if not self.path(ref).is_file()]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            pairs = [_slice(ref, _read_pair(ref.case)) for ref in chunk]
            pixels = torch.cat([prepare(rgb, self.preprocess)[0] for rgb, _ in pairs])
            with torch.no_grad():
                embeddings = encode(pixels).to(torch.float16).cpu()
            for ref, (_, labels), embedding in zip(chunk, pairs, embeddings):
                with atomic_path(self.path(ref)) as temporary:
                    save_file({"embedding": embedding.contiguous(), "labels": torch.from_numpy(labels)}, str(temporary))
                advance()

    def read(self, ref: SampleRef) -> tuple[Tensor, np.ndarray]:
        from safetensors.torch import load_file

        tensors = load_file(str(self.path(ref)))
        return tensors["embedding"], tensors["labels"].numpy()


def _slice(ref: SampleRef, pair: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    rgb, labels = pair
    return (rgb, labels) if ref.slice_index is None else (rgb[ref.slice_index], labels[ref.slice_index])


class SegmentationSamples(Dataset):
    """Samples for one epoch (`set_epoch`): dicts of ``pixels`` (3, S, S) or ``embedding``
    (C, E, E), ``target`` (1, L, L), ``box`` (4,), ``point`` (2,), ``clicks`` (K, 2) and
    ``click_labels`` (K,)."""

    def __init__(self, refs: Sequence[SampleRef], preprocess: PreprocessConfig, low_res: int,
                 options: SampleOptions, seed: int = 0, cache: EmbeddingCache | None = None) -> None:
        self.refs = list(refs)
        self.preprocess = preprocess
        self.low_res = low_res
        self.options = options
        self.seed = seed
        self.cache = cache
        self.epoch = 0
        self._volume: tuple[Path, tuple[np.ndarray, np.ndarray]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.refs)

    def _pair(self, ref: SampleRef) -> tuple[np.ndarray, np.ndarray]:
        if ref.slice_index is None:
            return _read_pair(ref.case)
        if self._volume is None or self._volume[0] != ref.case.image_path:  # consecutive slices share a read
            self._volume = (ref.case.image_path, _read_pair(ref.case))
        return _slice(ref, self._volume[1])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        ref = self.refs[index]
        train = self.options.train
        # validation draws its target label from a generator that does not change with the epoch
        rng = np.random.default_rng([self.seed, self.epoch, index] if train else [self.seed, index])
        sample: dict[str, Tensor] = {}
        if self.cache is not None:
            sample["embedding"], labels = self.cache.read(ref)
        else:
            rgb, labels = self._pair(ref)
            preprocess = self.preprocess
            if train and self.options.augment:
                moved_rgb, moved = augment(rgb, labels, rng)
                if moved.any():  # an augmentation that moves the foreground out of view is dropped
                    rgb, labels = moved_rgb, moved
                if self.options.robust:
                    rgb = degrade(rgb, rng)
                    preprocess = dataclasses.replace(preprocess, interpolation=ROBUST_KERNELS[rng.integers(len(ROBUST_KERNELS))])
            sample["pixels"] = prepare(rgb, preprocess)[0][0]
        sample |= self._target_and_prompts(labels, rng, train)
        return sample

    def _target_and_prompts(self, labels: np.ndarray, rng: np.random.Generator, train: bool) -> dict[str, Tensor]:
        present = np.unique(labels[labels != 0])
        target = labels != 0 if self.options.foreground else labels == present[rng.integers(len(present))]
        low = low_res_target(target, self.preprocess, self.low_res)
        if not low.any():  # a target too small for the low-res grid: its nearest pixel
            rows, cols = np.nonzero(target)
            new_hw = resized_shape(target.shape, self.preprocess)
            to_low = [n / o * self.low_res / self.preprocess.image_size for n, o in zip(new_hw, target.shape)]
            low[min(int(rows.mean() * to_low[0]), self.low_res - 1), min(int(cols.mean() * to_low[1]), self.low_res - 1)] = 1
        size = self.preprocess.image_size
        coords, labels = clicks(low, size, rng if train else None)
        return {
            "target": torch.from_numpy(low)[None],
            "box": torch.from_numpy(jittered_box(low, size, self.options.box_jitter, rng if train else None)),
            "point": torch.from_numpy(click(low, size, rng if train else None)),
            "clicks": torch.from_numpy(coords),
            "click_labels": torch.from_numpy(labels),
        }
