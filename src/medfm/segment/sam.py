"""SAM's network: a pluggable image encoder, the prompt encoder and the mask decoder.

The prompt encoder and the mask decoder are transformers' (``SamPromptEncoder``,
``SamMaskDecoder``), which compute what segment-anything's ``PromptEncoder`` and ``MaskDecoder``
compute, given three settings made here:

- the decoder's two-way transformer uses LayerNorm eps 1e-5 (``torch.nn.LayerNorm``'s default, which
  segment-anything uses); transformers' ``SamMaskDecoderConfig`` defaults to 1e-6;
- the random Fourier matrix of the positional encoding is drawn from N(0, 1) and frozen:
  segment-anything keeps it as a buffer, transformers makes it a trainable parameter drawn with
  std ``hidden_size // 2``;
- prompts are passed with transformers' "image batch" set to the number of prompts N and its
  "point batch" to 1, because transformers adds a mask prompt once per image; with one image row
  per prompt, each prompt gets its own mask prompt, as in segment-anything.

The ViT image encoder is transformers' ``SamVisionEncoder`` (same arithmetic as segment-anything's
``ImageEncoderViT``); the TinyViT encoder of LiteMedSAM is medfm's own (:mod:`medfm.segment.tinyvit`).
Pixel normalisation is not part of this module: ``encode`` takes already-normalised input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.models.sam.configuration_sam import (
    SamConfig,
    SamMaskDecoderConfig,
    SamPromptEncoderConfig,
    SamVisionConfig,
)
from transformers.models.sam.modeling_sam import SamMaskDecoder, SamPromptEncoder, SamVisionEncoder

from medfm.errors import PromptError
from medfm.segment.tinyvit import TinyViT, TinyViTConfig


@dataclass(frozen=True)
class ViTConfig:
    """segment-anything's ViT encoder body (ViTDet-style: windowed blocks plus a few global ones)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0

    @property
    def stride(self) -> int:
        """Input pixels per embedding cell."""
        return self.patch_size


@dataclass(frozen=True)
class SamCoreConfig:
    """Everything that fixes the shapes of a SAM network."""

    encoder: ViTConfig | TinyViTConfig
    image_size: int = 1024
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3

    @property
    def embedding_size(self) -> int:
        """Side E of the image embedding (B, prompt_embed_dim, E, E); low-res masks are 4E x 4E."""
        return self.image_size // self.encoder.stride


class SamViTEncoder(SamVisionEncoder):
    """transformers' SAM ViT encoder, returning the embedding tensor instead of a ModelOutput."""

    def forward(self, pixel_values: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(pixel_values).last_hidden_state


def _hf_vision_config(config: SamCoreConfig) -> SamVisionConfig:
    """transformers' vision config; for TinyViT only its positional-encoding fields matter."""
    enc = config.encoder
    common = dict(
        image_size=config.image_size,
        output_channels=config.prompt_embed_dim,
        num_pos_feats=config.prompt_embed_dim // 2,
        initializer_range=0.02,
    )
    if isinstance(enc, TinyViTConfig):
        return SamVisionConfig(**common)
    return SamVisionConfig(
        **common,
        hidden_size=enc.embed_dim,
        num_hidden_layers=enc.depth,
        num_attention_heads=enc.num_heads,
        patch_size=enc.patch_size,
        mlp_ratio=enc.mlp_ratio,
        window_size=enc.window_size,
        global_attn_indexes=list(enc.global_attn_indexes),
        layer_norm_eps=1e-6,
        qkv_bias=True,
        use_abs_pos=True,
        use_rel_pos=True,
    )


def _hf_sam_config(config: SamCoreConfig) -> SamConfig:
    prompt = SamPromptEncoderConfig(
        hidden_size=config.prompt_embed_dim,
        image_size=config.image_size,
        patch_size=config.encoder.stride,
        mask_input_channels=config.mask_in_chans,
    )
    decoder = SamMaskDecoderConfig(
        hidden_size=config.prompt_embed_dim,
        mlp_dim=config.decoder_mlp_dim,
        num_hidden_layers=config.decoder_depth,
        num_attention_heads=config.decoder_num_heads,
        num_multimask_outputs=config.num_multimask_outputs,
        iou_head_depth=3,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
        layer_norm_eps=1e-5,
    )
    hf_config = SamConfig(
        vision_config=_hf_vision_config(config), prompt_encoder_config=prompt, mask_decoder_config=decoder
    )
    hf_config.mask_decoder_config._attn_implementation = "eager"  # as SamModel sets it for its decoder
    return hf_config


class SamCore(nn.Module):
    """Image encoder + prompt encoder + mask decoder, with segment-anything's prompt semantics.

    ``encode`` runs once per image; ``decode`` batches any number of prompts against one cached
    embedding. Coordinates are (x, y) pixels in the model-input frame (``image_size`` square).
    """

    def __init__(self, config: SamCoreConfig) -> None:
        super().__init__()
        if config.image_size % config.encoder.stride:
            raise ValueError(f"image size {config.image_size} is not a multiple of the encoder stride")
        self.config = config
        hf_config = _hf_sam_config(config)
        if isinstance(config.encoder, TinyViTConfig):
            self.image_encoder: nn.Module = TinyViT(config.encoder, config.image_size, config.prompt_embed_dim)
        else:  # adapted ViTs (medfm.segment.adapters) bring their own builder
            build = getattr(config.encoder, "build_encoder", SamViTEncoder)
            self.image_encoder = build(hf_config.vision_config)
        self.prompt_encoder = SamPromptEncoder(hf_config)
        self.mask_decoder = SamMaskDecoder(hf_config.mask_decoder_config)
        gaussian = self.prompt_encoder.shared_embedding.positional_embedding
        with torch.no_grad():
            gaussian.normal_()
        gaussian.requires_grad_(False)

    def encode(self, pixel_values: Tensor) -> Tensor:
        """Normalised images (B, 3, S, S) -> image embeddings (B, prompt_embed_dim, E, E)."""
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"expected pixel_values of shape (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}")
        return self.image_encoder(pixel_values)

    def dense_positional_embedding(self) -> Tensor:
        """Positional encoding of every embedding cell centre, (1, prompt_embed_dim, E, E)."""
        e = self.config.embedding_size
        gaussian = self.prompt_encoder.shared_embedding.positional_embedding
        centres = (torch.arange(e, device=gaussian.device, dtype=gaussian.dtype) + 0.5) / e
        grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), dim=-1)  # (E, E, [x, y])
        return self.prompt_encoder.shared_embedding(grid).permute(2, 0, 1).unsqueeze(0)

    def decode(
        self,
        image_embedding: Tensor,
        boxes: Tensor | None = None,
        points: Tensor | None = None,
        point_labels: Tensor | None = None,
        mask_input: Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Predict masks for N prompts on one image embedding.

        Args:
            image_embedding: (1, C, E, E) from ``encode``, or (N, C, E, E): one image per prompt
                (training batches).
            boxes: (N, 4) as x0, y0, x1, y1.
            points: (N, K, 2) as x, y; ``point_labels`` (N, K): 1 foreground, 0 background,
                -1 padding (ignored).
            mask_input: (N, 1, 4E, 4E) low-res logits of an earlier prediction.
            multimask: return the 3 ambiguity-resolving masks instead of the single one.

        Returns:
            Low-res mask logits (N, M, 4E, 4E) and predicted IoUs (N, M); M is 3 with
            ``multimask``, else 1. With no prompt at all, N is the number of embeddings (1 for
            one image: segment-anything's behaviour).
        """
        n = self._prompt_count(image_embedding, boxes, points, point_labels, mask_input)
        dtype = image_embedding.dtype
        sparse, dense = self.prompt_encoder(
            input_points=None if points is None else points.to(dtype)[:, None],
            input_labels=None if point_labels is None else point_labels[:, None],
            input_boxes=None if boxes is None else boxes.to(dtype)[:, None],
            input_masks=None if mask_input is None else mask_input.to(dtype),
        )
        sparse, dense = self.prompt_embeddings(image_embedding, sparse, dense)
        masks, iou = self.mask_decoder(
            image_embeddings=image_embedding.expand(n, -1, -1, -1),
            image_positional_embeddings=self.dense_positional_embedding().to(dtype).expand(n, -1, -1, -1),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.expand(n, -1, -1, -1),
            multimask_output=multimask,
        )
        return masks[:, 0], iou[:, 0]

    def prompt_embeddings(self, image_embedding: Tensor, sparse: Tensor | None, dense: Tensor) -> tuple[Tensor | None, Tensor]:
        """The prompt encoder's sparse (N, 1, K, C) and dense (N or 1, C, E, E) embeddings as the
        decoder gets them; a prompt generator (AutoSAM, `medfm.segment.variants`) replaces them here."""
        return sparse, dense

    def _prompt_count(
        self,
        image_embedding: Tensor,
        boxes: Tensor | None,
        points: Tensor | None,
        point_labels: Tensor | None,
        mask_input: Tensor | None,
    ) -> int:
        """Check the prompt shapes against each other and the model; return N."""
        c, e = self.config.prompt_embed_dim, self.config.embedding_size
        if image_embedding.ndim != 4 or tuple(image_embedding.shape[1:]) != (c, e, e):
            raise ValueError(
                f"expected an image embedding of shape (1, {c}, {e}, {e}), got {tuple(image_embedding.shape)}"
            )
        if (points is None) != (point_labels is None):
            raise PromptError("points and point_labels must be given together")
        counts: dict[str, int] = {}
        if boxes is not None:
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise PromptError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
            counts["boxes"] = boxes.shape[0]
        if points is not None and point_labels is not None:
            if points.ndim != 3 or points.shape[2] != 2:
                raise PromptError(f"points must have shape (N, K, 2), got {tuple(points.shape)}")
            if tuple(point_labels.shape) != tuple(points.shape[:2]):
                raise PromptError(
                    f"point_labels must have shape {tuple(points.shape[:2])}, got {tuple(point_labels.shape)}"
                )
            counts["points"] = points.shape[0]
        if mask_input is not None:
            if tuple(mask_input.shape[1:]) != (1, 4 * e, 4 * e) or mask_input.ndim != 4:
                raise PromptError(f"mask_input must have shape (N, 1, {4 * e}, {4 * e}), got {tuple(mask_input.shape)}")
            counts["mask_input"] = mask_input.shape[0]
        if len(set(counts.values())) > 1:
            raise PromptError(f"prompt counts differ: {counts}")
        images = image_embedding.shape[0]
        n = next(iter(counts.values()), images)
        if n == 0:
            raise PromptError("empty prompt batch")
        if images not in (1, n):
            raise ValueError(f"{images} image embeddings for {n} prompts: give one, or one per prompt")
        return n


def _vit(embed_dim: int, depth: int, num_heads: int, global_attn_indexes: tuple[int, ...]) -> SamCoreConfig:
    return SamCoreConfig(encoder=ViTConfig(embed_dim, depth, num_heads, global_attn_indexes), image_size=1024)


# segment-anything's build_sam_vit_{b,l,h} and LiteMedSAM's build_lite_medsam, as data.
SAM_CONFIGS: dict[str, SamCoreConfig] = {
    "sam_vit_b": _vit(768, 12, 12, (2, 5, 8, 11)),
    "sam_vit_l": _vit(1024, 24, 16, (5, 11, 17, 23)),
    "sam_vit_h": _vit(1280, 32, 16, (7, 15, 23, 31)),
    "litemedsam": SamCoreConfig(encoder=TinyViTConfig(), image_size=256),
}


def build_sam(arch: str, **overrides: Any) -> SamCore:
    """Build a registered architecture with random weights, optionally changing config fields.

    ``overrides`` replace fields of :class:`SamCoreConfig`; ``encoder`` may be a dict that
    replaces fields of the encoder config, e.g. for a tiny test model::

        build_sam("sam_vit_b", image_size=64, encoder=dict(embed_dim=64, depth=2, num_heads=2,
                  global_attn_indexes=(1,), window_size=4))
    """
    return build_registered(SAM_CONFIGS, "SAM architecture", arch, **overrides)


def build_registered(configs: Mapping[str, SamCoreConfig], kind: str, arch: str, **overrides: Any) -> SamCore:
    """``configs[arch]`` built with random weights and ``overrides`` (see :func:`build_sam`); a
    KeyError naming the ``kind`` and the known names when ``arch`` is not there."""
    if arch not in configs:
        raise KeyError(f"unknown {kind} {arch!r}; known: {', '.join(configs)}")
    return SamCore(with_overrides(configs[arch], **overrides))


def with_overrides(config: SamCoreConfig, **overrides: Any) -> SamCoreConfig:
    """``config`` with fields replaced; ``encoder`` may be a dict of fields of the encoder config."""
    if isinstance(overrides.get("encoder"), dict):
        overrides["encoder"] = dataclasses.replace(config.encoder, **overrides["encoder"])
    return dataclasses.replace(config, **overrides)


def build_sam_vit_b(**overrides: Any) -> SamCore:
    """segment-anything's ViT-B SAM (also MedSAM's network)."""
    return build_sam("sam_vit_b", **overrides)


def build_sam_vit_l(**overrides: Any) -> SamCore:
    """segment-anything's ViT-L SAM."""
    return build_sam("sam_vit_l", **overrides)


def build_sam_vit_h(**overrides: Any) -> SamCore:
    """segment-anything's ViT-H SAM."""
    return build_sam("sam_vit_h", **overrides)


def build_litemedsam(**overrides: Any) -> SamCore:
    """LiteMedSAM: TinyViT encoder on 256x256 input, SAM's prompt encoder and mask decoder."""
    return build_sam("litemedsam", **overrides)


sam_model_registry: dict[str, Callable[..., SamCore]] = {
    "sam_vit_b": build_sam_vit_b,
    "sam_vit_l": build_sam_vit_l,
    "sam_vit_h": build_sam_vit_h,
    "litemedsam": build_litemedsam,
}
