"""Image encoders of the vision-language assembly: each turns ``(B, 3, S, S)`` pixels into a
sequence of feature tokens ``(B, N, C)`` for a connector. Built from a JSON spec (``kind``):

* ``clip-vision``: transformers' ``CLIPVisionModel`` (LLaVA, LLaVA-Med, the transformers llava
  folder), the hidden states of layer ``select_layer`` (LLaVA: -2); ``select_feature`` ``patch``
  drops the class token, ``cls_patch`` keeps it; ``post_norm`` applies the final LayerNorm to
  every token, as open_clip's token output does (OpenFlamingo, Med-Flamingo);
* ``blip2-vision``: transformers' ``Blip2VisionModel``: EVA-CLIP ViT-g as BLIP-2 / MiniGPT-4 /
  XrayGPT run it (``ln_vision`` is its ``post_layernorm``), every token;
* ``litemedsam``: medfm's frozen LiteMedSAM TinyViT (as medfm-clip-small's image tower), its
  256-channel map average-pooled to ``grid`` x ``grid`` tokens;
* ``medfm-clip``: a medfm dual encoder's whole image tower (``clip``: a registered name or folder,
  e.g. medfm-clip-small): its trained, L2-normalised image embedding (scaled to unit RMS) as the
  first token, then its backbone's map pooled to ``grid`` x ``grid`` tokens (medfm-vlm-small).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

KINDS = ("clip-vision", "blip2-vision", "litemedsam", "medfm-clip")


class ClipPatchEncoder(nn.Module):
    """A CLIP vision transformer read at one hidden layer, as LLaVA reads it."""

    def __init__(self, config: dict[str, Any], select_layer: int = -2, select_feature: str = "patch",
                 post_norm: bool = False) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        if select_feature not in {"patch", "cls_patch"}:
            raise ValueError(f"unknown select_feature '{select_feature}' (patch or cls_patch)")
        self.model = CLIPVisionModel(CLIPVisionConfig(**config))
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.post_norm = post_norm
        self.out_dim = self.model.config.hidden_size

    def forward(self, pixels: Tensor) -> Tensor:
        hidden = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[self.select_layer]
        if self.post_norm:  # open_clip's ln_post over every token (OpenFlamingo's vision features)
            hidden = self.model.post_layernorm(hidden)
        return hidden[:, 1:] if self.select_feature == "patch" else hidden


class Blip2VisionEncoder(nn.Module):
    """BLIP-2's EVA ViT with its final LayerNorm (LAVIS' ``ln_vision``): all tokens."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from transformers import Blip2VisionConfig, Blip2VisionModel

        self.model = Blip2VisionModel(Blip2VisionConfig(**config))
        self.out_dim = self.model.config.hidden_size

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model(pixel_values=pixels).last_hidden_state


class SamTokenEncoder(nn.Module):
    """LiteMedSAM's frozen TinyViT (`medfm.clip.towers.SamEncoderBackbone`), its pooled grid as tokens."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        from medfm.clip.towers import SamEncoderBackbone

        self.backbone = SamEncoderBackbone(**options)
        self.out_dim = self.backbone.out_dim

    def forward(self, pixels: Tensor) -> Tensor:
        return self.backbone(pixels).flatten(2).transpose(1, 2)


class DualEncoderImageTokens(nn.Module):
    """A medfm dual encoder's image tower, frozen: ``1 + grid * grid`` tokens (the embedding that
    was trained against text, which carries the findings, and the pooled feature map for detail)."""

    def __init__(self, clip: str = "medfm-clip-small", grid: int = 2) -> None:
        super().__init__()
        from medfm.clip import load

        self.clip = load(clip)
        self.clip.requires_grad_(False)
        self.grid = grid
        self.out_dim = int(self.clip.config["embed_dim"])
        backbone_dim = getattr(self.clip.image_backbone, "out_dim", None)
        if backbone_dim != self.out_dim:
            raise ValueError(f"{clip}: its backbone's {backbone_dim} channels differ from its {self.out_dim}-wide embedding")

    @property
    def preprocess(self) -> Any:
        """The dual encoder's own image preprocessing."""
        return self.clip.preprocess

    def train(self, mode: bool = True) -> DualEncoderImageTokens:
        """Stays in eval mode: the tower is frozen (its BatchNorm statistics too)."""
        return super().train(False)

    def forward(self, pixels: Tensor) -> Tensor:
        import torch.nn.functional as F

        features = self.clip.image_features(pixels)
        embedding = self.clip.embed_image_features(features) * self.out_dim**0.5
        grid = F.adaptive_avg_pool2d(features, self.grid).flatten(2).transpose(1, 2)
        return torch.cat([embedding.unsqueeze(1), grid], dim=1)


def build_encoder(spec: dict[str, Any]) -> nn.Module:
    """An image encoder from its spec (see the module docstring)."""
    kind = spec["kind"]
    options = {k: v for k, v in spec.items() if k != "kind"}
    if kind == "clip-vision":
        return ClipPatchEncoder(**options)
    if kind == "blip2-vision":
        return Blip2VisionEncoder(**options)
    if kind == "litemedsam":
        return SamTokenEncoder(**options)
    if kind == "medfm-clip":
        return DualEncoderImageTokens(**options)
    raise ValueError(f"unknown image encoder kind '{kind}' (one of {', '.join(KINDS)})")
