"""The predictor for adapted SAMs whose input pipeline the generic `Predictor` cannot express.

(SAM-Med2D's BGR order and INTER_NEAREST stretch are fields of its `PreprocessConfig`, so the
generic `Predictor` serves it.)

- :class:`SemanticPredictor`: SAMed's prompt-free multi-class segmentation, ``predict_classes()``
  -> a label map on the input grid, reproducing SAMed's ``test_single_volume``: a [0, 1] slice
  (CT clipped to [-125, 275] HU), cubic-spline zoom to the training resolution (224) and then
  to the network's 512, all ``num_classes + 1`` masks decoded without a prompt, logits bilinearly
  to 512, argmax, and a nearest-neighbour zoom back to the input size.

Prompted ``predict`` works on it as on any SAM (with the geometry set here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from medfm.errors import PromptError
from medfm.intensity import IntensityPreset, default_preset, scaler
from medfm.io import MedicalImage
from medfm.preprocess import Geometry, SliceValues
from medfm.segment.adapted import decode_all_masks
from medfm.segment.predictor import Predictor, per_slice

if TYPE_CHECKING:
    from medfm.segment.model import SegmentationModel

class SemanticPredictor(Predictor):
    """``set_image`` then ``predict_classes()``: one label per pixel, 0 for background.

    Intensities become [0, 1] as SAMed's data were: CT through SAMed's window (unless
    ``intensity`` names another), uint8 photos / 255, other images by their modality's preset.
    """

    def __init__(self, model: SegmentationModel, **options: Any) -> None:
        super().__init__(model, **options)
        if model.semantic is None:
            raise PromptError(f"{model.name} is not a prompt-free multi-class model (its config has no 'semantic' section)")
        self.settings = model.semantic
        self._class_logits: tuple[torch.Tensor, torch.Tensor] | None = None  # (embedding, logits)

    @property
    def class_names(self) -> tuple[str, ...]:
        """One name per label, background first; generic names when the model's count differs."""
        count = self.model.network.config.num_multimask_outputs + 1
        names = self.settings.class_names
        return names if len(names) == count else ("background", *(f"class {i}" for i in range(1, count)))

    def _values(self, image: MedicalImage, intensity: IntensityPreset | None) -> np.ndarray | SliceValues:
        array = np.asarray(image.array)
        if intensity is None and array.dtype == np.uint8:
            return per_slice(image, lambda part: part.astype(np.float32) / 255.0)
        if intensity is None:
            modality = (image.modality or "").upper()
            intensity = self.settings.ct_window if modality == "CT" else default_preset(image.modality)
        return per_slice(image, scaler(array, intensity))

    def _prepare_slice(self, values: np.ndarray) -> tuple[torch.Tensor, Geometry]:
        from scipy.ndimage import zoom

        grey = values.ndim == 2
        channels = [values] if grey else [values[..., c] for c in range(values.shape[-1])]
        height, width = channels[0].shape
        size = self.model.network.config.image_size
        for target in (self.settings.input_size, size):  # SAMed's two cubic-spline zooms
            if target and channels[0].shape != (target, target):
                h, w = channels[0].shape
                channels = [zoom(c, (target / h, target / w), order=3) for c in channels]
        stacked = np.stack(channels * 3 if grey else channels)
        mean = np.asarray(self.model.preprocess.pixel_mean, dtype=np.float64)[:, None, None] / 255.0
        std = np.asarray(self.model.preprocess.pixel_std, dtype=np.float64)[:, None, None] / 255.0
        pixels = torch.from_numpy(((stacked - mean) / std).astype(np.float32))[None]
        return pixels, Geometry((height, width), (size, size), self.model.preprocess)

    def class_logits(self) -> torch.Tensor:
        """Low-res logits of every class for the cached image, (num_classes + 1, h, w)."""
        if self.embedding is None:
            raise PromptError("call set_image() before predict_classes()")
        if self._class_logits is None or self._class_logits[0] is not self.embedding:
            with torch.inference_mode():
                logits = decode_all_masks(self.model.network, self.embedding)[0].float().cpu()
            self._class_logits = (self.embedding, logits)
        return self._class_logits[1]

    def predict_classes(self) -> np.ndarray:
        """The label map (H, W) of the cached image on its input grid (uint8, 0 = background)."""
        from scipy.ndimage import zoom

        logits = self.class_logits()
        size = self.model.network.config.image_size
        full = F.interpolate(logits[None], (size, size), mode="bilinear", align_corners=False)[0]
        labels = torch.argmax(full, dim=0).numpy().astype(np.uint8)
        height, width = self.geometry.original_hw
        if (height, width) != (size, size):
            labels = zoom(labels, (height / size, width / size), order=0)
        return labels


def predictor_for(model: SegmentationModel, **options: Any) -> Predictor:
    """The predictor a model's architecture needs, with `Predictor`'s options."""
    if model.semantic is not None:
        return SemanticPredictor(model, **options)
    return Predictor(model, **options)
