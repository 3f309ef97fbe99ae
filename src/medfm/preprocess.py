"""Each checkpoint's exact preprocessing, and its exact inverse back to the input grid.

SAM, MedSAM and LiteMedSAM resize, pad and normalise differently; getting that wrong gives a
plausible but wrong mask, the most common silent bug of the field. So the spec travels with the
checkpoint (`PreprocessConfig` lives in its config) and the predictor applies it here:

1. ``to_uint8_rgb``: raw intensities (HU, MR signal, 16-bit PNG) become the uint8 3-channel image
   the models were trained on, through one `medfm.intensity` preset (uint8 photos pass unchanged).
2. ``prepare``: resize (longest side + pad, or stretch) with the checkpoint's interpolation, then
   the checkpoint's normalisation; returns the model input and a `Geometry` that maps prompts in
   and logits back out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medfm.intensity import IntensityPreset, default_preset, scaler

RESIZE_MODES = {"longest-side", "stretch"}
INTERPOLATIONS = {"area", "nearest", "bilinear", "bicubic", "torch-bilinear-aa", "pil-bilinear", "skimage-cubic-aa"}
CHANNEL_ORDERS = {"rgb", "bgr"}
NORMALIZATIONS = {"minmax", "mean-std"}
UPSAMPLINGS = {"crop-then-resize", "pad-resize-crop-resize"}


@dataclass(frozen=True)
class PreprocessConfig:
    """The preprocessing a checkpoint was trained with.

    ``interpolation``: ``"area"`` is OpenCV's INTER_AREA (LiteMedSAM), ``"nearest"``,
    ``"bilinear"`` and ``"bicubic"`` OpenCV's INTER_NEAREST (SAM-Med2D's ``SammedPredictor``),
    INTER_LINEAR and INTER_CUBIC (no antialiasing), ``"torch-bilinear-aa"`` torch's antialiased
    bilinear on float values (not rounded back to uint8), ``"pil-bilinear"`` is PIL's
    antialiased bilinear on uint8 (segment-anything's ``ResizeLongestSide``), ``"skimage-cubic-aa"``
    is scikit-image's order-3 resize with anti-aliasing, rounded back to uint8 (MedSAM).
    ``channel_order``: ``"bgr"`` reverses the colour channels before anything else (SAM-Med2D reads
    and trains on ``cv2.imread``'s BGR images with SAM's RGB-ordered statistics); grey images are
    unaffected.
    ``normalization``: ``"minmax"`` scales the resized image to [0, 1] over all its pixels;
    ``"mean-std"`` subtracts ``pixel_mean`` and divides by ``pixel_std`` (0-255 scale).
    ``box_rounding``: ``"truncate"`` floors scaled box corners to integers (LiteMedSAM's
    ``resize_box_to_256``), ``"none"`` keeps them fractional (segment-anything).
    ``upsampling``: how low-res logits return to the input grid: ``"crop-then-resize"`` crops the
    unpadded part of the low-res logits and resizes it (LiteMedSAM); ``"pad-resize-crop-resize"``
    first upsamples to the padded model size, crops, then resizes (segment-anything).
    ``upsample_probabilities``: resize sigmoid probabilities instead of logits (MedSAM does), which
    moves boundary pixels slightly; logits are returned either way.
    """

    image_size: int = 256
    resize: str = "longest-side"
    interpolation: str = "area"
    normalization: str = "minmax"
    pixel_mean: tuple[float, float, float] | None = None
    pixel_std: tuple[float, float, float] | None = None
    box_rounding: str = "truncate"
    upsampling: str = "crop-then-resize"
    upsample_probabilities: bool = False
    mask_threshold: float = 0.0
    channel_order: str = "rgb"

    def __post_init__(self) -> None:
        for value, allowed in [
            (self.resize, RESIZE_MODES),
            (self.interpolation, INTERPOLATIONS),
            (self.normalization, NORMALIZATIONS),
            (self.upsampling, UPSAMPLINGS),
            (self.box_rounding, {"truncate", "none"}),
            (self.channel_order, CHANNEL_ORDERS),
        ]:
            if value not in allowed:
                raise ValueError(f"unknown preprocessing option '{value}'; choose one of {sorted(allowed)}")
        if self.normalization == "mean-std" and (self.pixel_mean is None or self.pixel_std is None):
            raise ValueError("mean-std normalisation needs pixel_mean and pixel_std")

    def to_dict(self) -> dict:
        """JSON-ready form for a model's ``config.json``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessConfig:
        """Inverse of `to_dict` (lists become tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


#: segment-anything's ImageNet statistics on the 0-255 scale.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

LITEMEDSAM_PREPROCESS = PreprocessConfig()
MEDSAM_PREPROCESS = PreprocessConfig(
    image_size=1024,
    resize="stretch",
    interpolation="skimage-cubic-aa",
    box_rounding="none",
    upsample_probabilities=True,
)
SAM_PREPROCESS = PreprocessConfig(
    image_size=1024,
    interpolation="pil-bilinear",
    normalization="mean-std",
    pixel_mean=SAM_PIXEL_MEAN,
    pixel_std=SAM_PIXEL_STD,
    box_rounding="none",
    upsampling="pad-resize-crop-resize",
)


def to_uint8_rgb(array: np.ndarray, preset: IntensityPreset | None = None, modality: str | None = None) -> np.ndarray:
    """The uint8 ``(..., 3)`` image a SAM-family model expects.

    uint8 input passes unchanged unless a preset is named; anything else (CT in HU, MR, 16-bit)
    goes through ``preset`` (default: the modality's, see `medfm.intensity.default_preset`),
    is scaled to 0-255 and rounded. Grey images are repeated to three channels. Call it on a whole
    volume to normalise all slices alike.
    """
    array = np.asarray(array)
    return uint8_rgb_converter(array, preset, modality)(array)


def uint8_rgb_converter(
    array: np.ndarray, preset: IntensityPreset | None = None, modality: str | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """`to_uint8_rgb` fitted to ``array`` (a volume: its percentiles or min/max), to apply to any
    part of it, e.g. one slice at a time."""
    array = np.asarray(array)
    is_rgb = array.ndim >= 3 and array.shape[-1] == 3
    scale = scaler(array, preset or default_preset(modality)) if array.dtype != np.uint8 or preset is not None else None

    def convert(part: np.ndarray) -> np.ndarray:
        part = np.asarray(part)
        if scale is not None:
            part = np.round(scale(part) * 255.0).astype(np.uint8)
        return part if is_rgb else np.repeat(part[..., None], 3, axis=-1)

    return convert


class SliceValues:
    """A volume's slices as model input values, converted when a slice is asked for, not before: a
    500-slice CT is not turned into 400 MB of RGB to encode the 30 slices a structure spans."""

    def __init__(self, volume: np.ndarray, convert: Callable[[np.ndarray], np.ndarray]) -> None:
        self.volume, self.convert = volume, convert

    def __len__(self) -> int:
        return len(self.volume)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.convert(self.volume[index])


@dataclass(frozen=True)
class Geometry:
    """Where the input image sits inside the model's square input, for mapping in and out."""

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    config: PreprocessConfig

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Model-input pixels per input pixel along x and y."""
        (height, width), (new_h, new_w) = self.original_hw, self.resized_hw
        return new_w / width, new_h / height

    def boxes_to_model(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) input-pixel boxes to the model-input frame, rounded as the checkpoint expects."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if self.config.box_rounding == "truncate":
            # LiteMedSAM: one ratio for both axes (longest side), truncated toward zero
            ratio = self.config.image_size / max(self.original_hw)
            return np.trunc(boxes * ratio)
        sx, sy = self.scale_xy
        return boxes * np.array([sx, sy, sx, sy])

    def points_to_model(self, coords: np.ndarray) -> np.ndarray:
        """(..., 2) input-pixel (x, y) points to the model-input frame (segment-anything's apply_coords)."""
        sx, sy = self.scale_xy
        return np.asarray(coords, dtype=np.float64) * np.array([sx, sy])

    def logits_to_input(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res logits (N, M, h, w) on the model grid -> logits (N, M, H, W) on the input grid."""
        size = self.config.image_size
        new_h, new_w = self.resized_hw
        if self.config.upsampling == "pad-resize-crop-resize":
            full = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
            cropped = full[..., :new_h, :new_w]
        else:
            low_h, low_w = low_res.shape[-2:]
            cropped = low_res[..., : round(new_h * low_h / size), : round(new_w * low_w / size)]
        if not self.config.upsample_probabilities:
            return F.interpolate(cropped, self.original_hw, mode="bilinear", align_corners=False)
        probabilities = F.interpolate(torch.sigmoid(cropped), self.original_hw, mode="bilinear", align_corners=False)
        return torch.logit(probabilities, eps=1e-6)

    def mask_to_model(self, mask: np.ndarray, low_res_size: int) -> np.ndarray:
        """A binary (H, W) mask on the input grid -> the (low, low) mask-prompt frame, as logits."""
        new_h, new_w = self.resized_hw
        scale = low_res_size / self.config.image_size
        resized = F.interpolate(
            torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None],
            (max(1, round(new_h * scale)), max(1, round(new_w * scale))),
            mode="bilinear",
            align_corners=False,
        )[0, 0].numpy()
        frame = np.full((low_res_size, low_res_size), -20.0, dtype=np.float32)
        frame[: resized.shape[0], : resized.shape[1]] = np.where(resized > 0.5, 20.0, -20.0)
        return frame


def _resize(rgb: np.ndarray, new_hw: tuple[int, int], interpolation: str) -> np.ndarray:
    new_h, new_w = new_hw
    if interpolation in ("area", "nearest", "bilinear", "bicubic"):
        import cv2

        flag = {"area": cv2.INTER_AREA, "nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR,
                "bicubic": cv2.INTER_CUBIC}[interpolation]
        return cv2.resize(rgb, (new_w, new_h), interpolation=flag)
    if interpolation == "torch-bilinear-aa":
        pixels = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
        resized = F.interpolate(pixels, (new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        return resized[0].permute(1, 2, 0).numpy()
    if interpolation == "skimage-cubic-aa":
        from skimage.transform import resize

        resized = resize(rgb, (new_h, new_w), order=3, preserve_range=True, mode="constant", anti_aliasing=True)
        return resized.astype(np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BILINEAR))


def resized_shape(original_hw: tuple[int, int], config: PreprocessConfig) -> tuple[int, int]:
    """Size of the image inside the model input (segment-anything's get_preprocess_shape)."""
    if config.resize == "stretch":
        return config.image_size, config.image_size
    height, width = original_hw
    scale = config.image_size * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def prepare(rgb: np.ndarray, config: PreprocessConfig) -> tuple[torch.Tensor, Geometry]:
    """uint8 (H, W, 3) -> the model input (1, 3, S, S) float32 and its `Geometry`."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"prepare() takes a uint8 (H, W, 3) image, got {rgb.dtype} {rgb.shape}")
    original_hw = (int(rgb.shape[0]), int(rgb.shape[1]))
    if config.channel_order == "bgr":
        rgb = np.ascontiguousarray(rgb[..., ::-1])
    new_hw = resized_shape(original_hw, config)
    resized = _resize(rgb, new_hw, config.interpolation)
    if config.normalization == "minmax":
        low, high = float(resized.min()), float(resized.max())
        values = (resized.astype(np.float64) - low) / max(high - low, 1e-8)
    else:
        values = (resized.astype(np.float64) - np.asarray(config.pixel_mean)) / np.asarray(config.pixel_std)
    size = config.image_size
    padded = np.zeros((size, size, 3), dtype=np.float32)
    padded[: new_hw[0], : new_hw[1]] = values
    tensor = torch.from_numpy(padded).permute(2, 0, 1)[None].contiguous()
    return tensor, Geometry(original_hw, new_hw, config)
