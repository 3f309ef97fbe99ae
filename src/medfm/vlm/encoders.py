"""Image encoders of the vision-language assembly: each turns ``(B, 3, S, S)`` pixels into a
sequence of feature tokens ``(B, N, C)`` for a connector. Built from a JSON spec (``kind``):

* ``clip-vision``: transformers' ``CLIPVisionModel`` (LLaVA, LLaVA-Med, the transformers llava
  folder), the hidden states of layer ``select_layer`` (LLaVA: -2); ``select_feature`` ``patch``
  drops the class token, ``cls_patch`` keeps it; ``post_norm`` applies the final LayerNorm to
  every token, as open_clip's token output does (OpenFlamingo, Med-Flamingo);
* ``blip2-vision``: transformers' ``Blip2VisionModel``: EVA-CLIP ViT-g as BLIP-2 / MiniGPT-4 /
  XrayGPT run it (``ln_vision`` is its ``post_layernorm``), every token;
* ``litemedsam``: medfm's frozen LiteMedSAM TinyViT (as medfm-clip-small's image tower), its
  256-channel map average-pooled to ``grid`` x ``grid`` tokens.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

KINDS = ("clip-vision", "blip2-vision", "litemedsam")


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
    raise ValueError(f"unknown image encoder kind '{kind}' (one of {', '.join(KINDS)})")
