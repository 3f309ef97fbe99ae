"""Image preprocessing of the dual encoders; like a SAM checkpoint's, it travels with the checkpoint.

The published contrastive models prepare their inputs differently: OpenAI CLIP and BiomedCLIP
(open_clip) resize the shortest side with bicubic interpolation and centre-crop, then normalise
with CLIP's mean/std; CheXzero resizes the longest side to 320 px, pads to a centred square and
normalises with its own chest X-ray mean/std; medfm-clip-small feeds LiteMedSAM's encoder, which
takes a longest-side INTER_AREA resize, min-max scaling and bottom-right zero padding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from os import PathLike

import numpy as np
import torch

from medfm.errors import InputFileError
from medfm.io import MedicalImage, read_image
from medfm.preprocess import to_uint8_rgb

RESIZES = {"longest-side", "longest-side-center", "shortest-side-crop", "stretch"}
INTERPOLATIONS = {"area", "bicubic", "bilinear"}

#: OpenAI CLIP's (and BiomedCLIP's) statistics on the 0-1 scale.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePreprocess:
    """How a dual encoder's image tower wants its pixels.

    ``resize``: ``"longest-side"`` (scale the longest side to ``image_size``, pad bottom-right with
    zeros, as LiteMedSAM), ``"longest-side-center"`` (the same, padded to a centred square, as
    CheXzero), ``"shortest-side-crop"`` (scale the shortest side, centre-crop, as CLIP) or
    ``"stretch"`` (both sides to ``image_size``, ignoring the aspect ratio, as BLIP-2's eval processor).
    ``normalization``: ``"minmax"`` over the resized image, or ``"mean-std"`` with ``mean``/``std``
    on the 0-1 scale (applied before padding, so the padding stays 0 as in the originals).
    """

    image_size: int = 224
    resize: str = "shortest-side-crop"
    interpolation: str = "bicubic"
    normalization: str = "mean-std"
    mean: tuple[float, float, float] | None = CLIP_MEAN
    std: tuple[float, float, float] | None = CLIP_STD

    def __post_init__(self) -> None:
        if self.resize not in RESIZES or self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown resize '{self.resize}' or interpolation '{self.interpolation}'")
        if self.normalization not in {"minmax", "mean-std"}:
            raise ValueError(f"unknown normalization '{self.normalization}'")
        if self.normalization == "mean-std" and (self.mean is None or self.std is None):
            raise ValueError("mean-std normalisation needs mean and std")

    def to_dict(self) -> dict:
        """JSON-ready form for a model's ``config.json``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ImagePreprocess:
        """Inverse of `to_dict` (lists become tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 ``(H, W, 3)`` -> float32 ``(3, S, S)``."""
        import cv2

        size = self.image_size
        height, width = rgb.shape[:2]
        flags = {"area": cv2.INTER_AREA, "bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR}[self.interpolation]
        if self.resize == "stretch":
            new_h, new_w = size, size
        elif self.resize == "shortest-side-crop":
            scale = size / min(height, width)
            new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        else:
            scale = size / max(height, width)
            new_h, new_w = max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
        resized = cv2.resize(rgb, (new_w, new_h), interpolation=flags).astype(np.float64)
        if self.normalization == "minmax":
            values = (resized - resized.min()) / max(resized.max() - resized.min(), 1e-8)
        else:
            values = (resized / 255.0 - np.asarray(self.mean)) / np.asarray(self.std)
        if self.resize in {"shortest-side-crop", "stretch"}:
            top, left = (new_h - size) // 2, (new_w - size) // 2
            square = values[top : top + size, left : left + size]
        else:
            square = np.zeros((size, size, 3))
            top, left = ((size - new_h) // 2, (size - new_w) // 2) if self.resize == "longest-side-center" else (0, 0)
            square[top : top + new_h, left : left + new_w] = values
        return torch.from_numpy(np.ascontiguousarray(square, dtype=np.float32)).permute(2, 0, 1)


#: What `image_rgb` accepts: a file, a `MedicalImage`, or a uint8 RGB / grey array.
ImageLike = str | PathLike[str] | MedicalImage | np.ndarray


def image_rgb(image: ImageLike) -> np.ndarray:
    """A 2D image as the uint8 ``(H, W, 3)`` the towers take (grey and raw intensities through
    `medfm.preprocess.to_uint8_rgb`); volumes are refused, naming the file."""
    if isinstance(image, np.ndarray):
        return to_uint8_rgb(image)
    if not isinstance(image, MedicalImage):
        image = read_image(image)
    if image.is_volume:
        raise InputFileError(image.path, "is a 3D volume; zero-shot classification takes a 2D image (pass a slice)")
    return to_uint8_rgb(image.array[..., :3] if image.channels > 3 else image.array, modality=image.modality)


#: medfm-clip-small: LiteMedSAM's input pipeline (INTER_AREA longest side, min-max, zero pad) at 112 px
#: (the attention windows then tile the feature maps exactly; 4x cheaper than 256 px on a CPU).
SMALL_PREPROCESS = ImagePreprocess(image_size=112, resize="longest-side", interpolation="area", normalization="minmax", mean=None, std=None)
#: CheXzero: longest side to 320 px, centred square, its chest X-ray statistics (101.48761 and 83.43944 on 0-255).
CHEXZERO_PREPROCESS = ImagePreprocess(image_size=320, resize="longest-side-center", interpolation="bicubic",
                                      mean=(101.48761 / 255,) * 3, std=(83.43944 / 255,) * 3)
