"""The interactive predictor: encode an image once, then answer any number of prompts cheaply.

Modelled on segment-anything's ``SamPredictor``, with medfm's additions: it takes a
`MedicalImage` (or a path), applies the checkpoint's own preprocessing, validates prompts against
the input, and returns masks on exactly the input grid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import TYPE_CHECKING

import numpy as np
import torch

from medfm.errors import ModelOutputError, PromptError
from medfm.intensity import IntensityPreset
from medfm.io import MedicalImage, read_image
from medfm.preprocess import Geometry, SliceValues, prepare, uint8_rgb_converter
from medfm.prompts import Box, Points

if TYPE_CHECKING:
    from medfm.segment.model import SegmentationModel


@dataclass
class Prediction:
    """Masks for N prompts on the input grid.

    ``masks`` (N, H, W) bool, ``scores`` (N,) predicted IoU, ``logits`` (N, H, W) float32 on the
    input grid, ``low_res_logits`` (N, h, w) on the model's low-res grid (feed them back as
    ``mask_input``). With ``multimask`` the best of the candidates is chosen per prompt and all of
    them are in ``candidates`` (N, M, H, W) and ``candidate_scores`` (N, M).
    """

    masks: np.ndarray
    scores: np.ndarray
    logits: np.ndarray
    low_res_logits: np.ndarray
    candidates: np.ndarray | None = None
    candidate_scores: np.ndarray | None = None

    def label_map(self) -> np.ndarray:
        """One label per prompt (1..N, 0 background); where masks overlap the higher logit wins."""
        if len(self.masks) == 0:
            raise PromptError("no prompts, so no label map")
        winner = np.argmax(np.where(self.masks, self.logits, -np.inf), axis=0)
        labels = (winner + 1).astype(np.uint8 if len(self.masks) < 256 else np.uint16)
        return np.where(self.masks.any(axis=0), labels, 0).astype(labels.dtype)


BoxesLike = Box | Sequence[Box] | Sequence[Sequence[float]] | np.ndarray


class Predictor:
    """``set_image`` once (the costly encoder pass), then ``predict`` with boxes, points or masks.

    ``optimize`` (default on) runs the network through `medfm.segment.fast.InferenceEngine`:
    BatchNorm folded and fused oneDNN kernels in LiteMedSAM's encoder, and a decoder that caches
    all that does not depend on the prompt; same masks as the plain modules (logits within ~1e-4).
    ``precision="bf16"`` (opt-in, CPUs with native bfloat16) is faster again and moves logits by
    ~1e-2, so a few boundary pixels may flip. ``optimize=False`` runs the plain modules.
    ``backend="openvino"`` (default: the model's, see `medfm.load`) runs the image encoder on
    OpenVINO's CPU runtime (`medfm.segment.openvino_backend`); the decoder stays on torch.
    """

    def __init__(self, model: SegmentationModel, *, optimize: bool = True, precision: str = "fp32",
                 backend: str | None = None) -> None:
        from medfm.segment.fast import InferenceEngine, check_precision

        check_precision(precision)
        if precision != "fp32" and not optimize:
            raise ValueError(f"precision {precision!r} needs optimize=True")
        self.model = model
        self.engine = InferenceEngine(model.network, precision) if optimize else None
        self.backend = getattr(model, "backend", "torch") if backend is None else backend
        self._openvino = None
        if self.backend != "torch":
            from medfm.segment.openvino_backend import EncoderBackend, check_backend

            check_backend(self.backend)
            self._openvino = EncoderBackend(model.network, precision)
        self.embedding: torch.Tensor | None = None
        self.geometry: Geometry | None = None
        self._values_cache: tuple[np.ndarray, IntensityPreset | None, np.ndarray | SliceValues] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.network.parameters()).device

    def set_image(
        self,
        image: MedicalImage | str | PathLike[str] | np.ndarray,
        slice_index: int | None = None,
        intensity: IntensityPreset | None = None,
    ) -> None:
        """Encode one 2D image, or slice ``slice_index`` (along Z) of a volume, and cache it.

        Intensities are normalised over the whole volume (not per slice) with ``intensity`` or
        the modality's default preset; uint8 photographs pass unchanged.
        """
        image = as_image(image)
        values = _pick_slice(image, self._cached_values(image, intensity), slice_index)
        pixels, self.geometry = self._prepare_slice(values)
        with torch.inference_mode():
            self.embedding = self._encode(pixels.to(self.device))
            if self.engine is not None:
                self.engine.prepare(self.embedding)  # the decoder's per-image cache, once

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._openvino is not None and pixels.device.type == "cpu":
            return self._openvino(pixels)
        return self.model.network.encode(pixels) if self.engine is None else self.engine.encode(pixels)

    def encode_slices(
        self, image: MedicalImage, indices: Sequence[int], intensity: IntensityPreset | None = None, batch_size: int = 4
    ) -> Iterator[tuple[int, torch.Tensor, Geometry]]:
        """Encode slices of a volume in batches (the encoder dominates 3D time) and yield
        ``(index, embedding, geometry)``; pass them to `use_embedding` to prompt a slice."""
        volume = self._cached_values(image, intensity)
        for start in range(0, len(indices), batch_size):
            chunk = list(indices[start : start + batch_size])
            prepared = [self._prepare_slice(volume[index]) for index in chunk]
            pixels = torch.cat([pixels for pixels, _ in prepared]).to(self.device)
            with torch.inference_mode():
                embeddings = self._encode(pixels)
            for offset, index in enumerate(chunk):
                yield index, embeddings[offset : offset + 1], prepared[offset][1]

    def use_embedding(self, embedding: torch.Tensor, geometry: Geometry) -> None:
        """Make a previously computed embedding (from `encode_slices`) the one `predict` answers for."""
        self.embedding, self.geometry = embedding, geometry

    # The two steps of the input pipeline; predictors of checkpoints that were trained on other
    # pipelines (SAM-Med2D, SAMed) override them.

    def _values(self, image: MedicalImage, intensity: IntensityPreset | None) -> np.ndarray | SliceValues:
        """The whole image as the values ``_prepare_slice`` takes; a volume's slices all alike
        (statistics over the whole volume), each converted when it is encoded."""
        return per_slice(image, uint8_rgb_converter(image.array, intensity, image.modality))

    def _prepare_slice(self, values: np.ndarray) -> tuple[torch.Tensor, Geometry]:
        """One slice's values -> the network's input (1, 3, S, S) and the geometry back."""
        return prepare(values, self.model.preprocess)

    def _cached_values(self, image: MedicalImage, intensity: IntensityPreset | None) -> np.ndarray:
        # keyed by the array object itself (held, so its id cannot be reused by a later image)
        cached = self._values_cache
        if cached is None or cached[0] is not image.array or cached[1] != intensity:
            self._values_cache = cached = (image.array, intensity, self._values(image, intensity))
        return cached[2]

    def predict(
        self,
        boxes: BoxesLike | None = None,
        points: Points | np.ndarray | Sequence | None = None,
        point_labels: np.ndarray | Sequence | None = None,
        mask_input: np.ndarray | Prediction | None = None,
        multimask: bool = False,
    ) -> Prediction:
        """Masks for every prompt of the cached image, batched through the decoder in one call.

        ``boxes``: N boxes (`Box` or ``[x0, y0, x1, y1]``). ``points``: `Points`, or coordinates
        (K, 2) for one prompt or (N, K, 2) for N prompts, with ``point_labels`` (1 positive, 0
        negative; all positive if omitted). With both boxes and points, the points belong to the
        boxes one to one (or a single point set to a single box). ``mask_input``: a binary mask on
        the input grid (H, W) or (N, H, W), or a previous `Prediction` to refine.
        """
        if self.embedding is None or self.geometry is None:
            raise PromptError("call set_image() before predict()")
        height, width = self.geometry.original_hw
        box_array = self._boxes(boxes, height, width)
        coords, labels = self._points(points, point_labels, height, width)
        count = _prompt_count(box_array, coords, mask_input)
        to_tensor = lambda array: torch.as_tensor(array, dtype=torch.float32, device=self.device)  # noqa: E731
        model_boxes = to_tensor(self.geometry.boxes_to_model(box_array)) if box_array is not None else None
        model_points = model_labels = None
        if coords is not None:
            model_points = to_tensor(self.geometry.points_to_model(coords))
            model_labels = torch.as_tensor(labels, dtype=torch.int64, device=self.device)
        masks_in = self._mask_input(mask_input, count)
        decode = self.model.network.decode if self.engine is None else self.engine.decode
        with torch.inference_mode():
            low_res, iou = decode(
                self.embedding, boxes=model_boxes, points=model_points, point_labels=model_labels,
                mask_input=masks_in, multimask=multimask,
            )
            ModelOutputError.unless_finite(self.model.name, "mask logits or scores", low_res, iou)
            logits = self.geometry.logits_to_input(low_res)
        threshold = self.model.preprocess.mask_threshold
        low_res, iou, logits = low_res.float().cpu().numpy(), iou.float().cpu().numpy(), logits.float().cpu().numpy()
        best = np.argmax(iou, axis=1)
        rows = np.arange(len(best))
        return Prediction(
            masks=logits[rows, best] > threshold,
            scores=iou[rows, best],
            logits=logits[rows, best],
            low_res_logits=low_res[rows, best],
            candidates=logits > threshold if multimask else None,
            candidate_scores=iou if multimask else None,
        )

    @staticmethod
    def _boxes(boxes: BoxesLike | None, height: int, width: int) -> np.ndarray | None:
        if boxes is None:
            return None
        if isinstance(boxes, Box) or (isinstance(boxes, np.ndarray) and boxes.ndim == 1):
            boxes = [boxes]
        items = []
        for box in boxes:
            if not isinstance(box, Box):
                values = [float(v) for v in np.asarray(box).reshape(-1)]
                if len(values) != 4:
                    raise PromptError(f"a box needs 4 numbers (x0, y0, x1, y1), got {values}")
                box = Box(*values)
            box.check_inside(height, width)
            items.append(box.as_array())
        if not items:
            raise PromptError("the list of boxes is empty")
        return np.stack(items)

    @staticmethod
    def _points(points, labels, height: int, width: int) -> tuple[np.ndarray | None, np.ndarray | None]:  # noqa: ANN001
        if points is None:
            if labels is not None:
                raise PromptError("point_labels given without points")
            return None, None
        if isinstance(points, Points):
            groups = [points]
        else:
            coords = np.asarray(points, dtype=np.float64)
            if coords.ndim == 2:
                coords = coords[None]
            if coords.ndim != 3 or coords.shape[-1] != 2 or coords.shape[1] == 0:
                raise PromptError(f"points must have shape (K, 2) or (N, K, 2), got {np.shape(points)}")
            label_array = np.ones(coords.shape[:2]) if labels is None else np.asarray(labels).reshape(coords.shape[:2])
            groups = [Points(c, l) for c, l in zip(coords, label_array)]
        for group in groups:
            group.check_inside(height, width)
        return np.stack([g.coords for g in groups]), np.stack([g.labels for g in groups])

    def _mask_input(self, mask_input: np.ndarray | Prediction | None, count: int) -> torch.Tensor | None:
        if mask_input is None:
            return None
        low = 4 * self.model.network.config.embedding_size
        if isinstance(mask_input, Prediction):
            frames = mask_input.low_res_logits
        else:
            masks = np.asarray(mask_input)
            masks = masks[None] if masks.ndim == 2 else masks
            if masks.shape[1:] != self.geometry.original_hw:
                raise PromptError(f"mask_input has shape {masks.shape[1:]}, the image {self.geometry.original_hw}")
            frames = np.stack([self.geometry.mask_to_model(m, low) for m in masks])
        if len(frames) != count:
            raise PromptError(f"{len(frames)} mask inputs for {count} prompts")
        return torch.as_tensor(frames, dtype=torch.float32, device=self.device)[:, None]


def _prompt_count(boxes: np.ndarray | None, coords: np.ndarray | None, mask_input: object) -> int:
    counts = {len(a) for a in (boxes, coords) if a is not None}
    if len(counts) > 1:
        raise PromptError(f"{len(boxes)} boxes but {len(coords)} point sets: give one point set per box")
    if counts:
        return counts.pop()
    if mask_input is None:
        raise PromptError("no prompt given: pass boxes, points or mask_input")
    if isinstance(mask_input, Prediction):
        return len(mask_input.low_res_logits)
    return 1 if np.ndim(mask_input) == 2 else len(mask_input)


def as_image(image: MedicalImage | str | PathLike[str] | np.ndarray) -> MedicalImage:
    """A `MedicalImage` from itself, a path, or a numpy array (H, W) or (H, W, 3)."""
    if isinstance(image, MedicalImage):
        return image
    if not isinstance(image, np.ndarray):
        return read_image(image)
    from medfm.io.image import image_geometry_2d

    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3)):
        raise PromptError(f"a numpy image must be (H, W) or (H, W, 3), got {image.shape}")
    return MedicalImage(array=image, metadata={"kind": "image", "format": "array"}, **image_geometry_2d())


def per_slice(image: MedicalImage, convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray | SliceValues:
    """A 2D image converted now; a volume's slices converted one by one when asked for."""
    return SliceValues(image.array, convert) if image.is_volume else convert(image.array)


def _pick_slice(image: MedicalImage, values: np.ndarray, slice_index: int | None) -> np.ndarray:
    """The 2D slice of ``values`` (the image's values, possibly normalised) to encode."""
    if image.is_volume:
        if slice_index is None:
            raise PromptError(f"{image.path or 'the image'} is a volume: pass slice_index (0..{len(values) - 1})")
        if not -len(values) <= slice_index < len(values):
            raise PromptError(f"slice {slice_index} is outside the volume's {len(values)} slices")
        return values[slice_index]
    if slice_index not in (None, 0):
        raise PromptError("slice_index only applies to volumes")
    return values
