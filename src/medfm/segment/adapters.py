"""Adapted SAM ViT encoders: SAM-Med2D's adapters, Medical SAM Adapter's (MSA) adapters, SAMed's LoRA.

Each is SAM's ViT image encoder (transformers' ``SamVisionLayer`` blocks, so the base weights keep
SamCore's key names) with a few parameter-efficient modules added to every block. The modules keep
the attribute names of the original repositories, so a checkpoint converted with segment-anything's
key rules (``image_encoder.blocks.N.`` -> ``image_encoder.layers.N.``) loads without further renaming:

SAM-Med2D (OpenGVLab/SAM-Med2D, ``segment_anything/modeling/image_encoder.py``), per block::

    image_encoder.blocks.N.Adapter.norm.{weight,bias}      LayerNorm(C), eps 1e-5
    image_encoder.blocks.N.Adapter.channel.0.weight        (C/4, C)   Linear, no bias
    image_encoder.blocks.N.Adapter.channel.2.weight        (C, C/4)   Linear, no bias (then sigmoid)
    image_encoder.blocks.N.Adapter.spatial.0.weight        (C, C, 3, 3)  Conv2d stride 2, no bias
    image_encoder.blocks.N.Adapter.spatial.2.weight        (C, C, 4, 4)  ConvTranspose2d stride 2, no bias

  applied in parallel to the MLP on the same normalised tokens:
  ``x = x + attn(norm1(x)); n = norm2(x); x = x + mlp(n) + Adapter(n)`` with
  ``Adapter(n) = norm(n + spatial(sigmoid(channel(mean_hw(n))) * n))``.

MSA (KidsWithTokens/Medical-SAM-Adapter, ``models/ImageEncoder/vit/adapter_block.py`` and
``models/common/adapter.py``), per block, each a bottleneck ``D_fc2(GELU(D_fc1(x)))`` of width C/4::

    image_encoder.blocks.N.MLP_Adapter.D_fc{1,2}.{weight,bias}    no skip connection, scaled by 0.5
    image_encoder.blocks.N.Space_Adapter.D_fc{1,2}.{weight,bias}  with skip connection, after attention
    image_encoder.blocks.N.Depth_Adapter.D_fc{1,2}.{weight,bias}  no skip; 3D chunks only

  ``x = x + Space_Adapter(attn(norm1(x))) [+ depth branch]; n = norm2(x);
  x = x + mlp(n) + 0.5 * MLP_Adapter(n)``. MSA partitions windows *before* ``norm1`` (padding
  tokens are ``norm1(0)``, not 0 as in SAM), keeps ``pos_embed`` at 64x64 (SAM's 1024 px grid,
  bicubically resized to the input's grid on every forward) and the global blocks' relative
  positions at 127 (2 * 64 - 1) whatever the image size; all three are reproduced here.

SAMed (hitachinsk/SAMed, ``sam_lora_image_encoder.py``): rank-r LoRA on the q and v thirds of every
block's fused ``qkv`` projection (k untouched, no alpha/r scaling). :class:`LoRAQKVLinear` holds them
as ``attn.qkv.w_a_q`` (r, C), ``w_b_q`` (C, r), ``w_a_v``, ``w_b_v`` (``nn.Linear`` weight layout);
SAMed's LoRA file numbers them ``w_a_{2N:03d}`` (q) and ``w_a_{2N+1:03d}`` (v) for block N.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.sam.configuration_sam import SamVisionConfig
from transformers.models.sam.modeling_sam import SamPatchEmbeddings, SamVisionLayer, SamVisionNeck

from medfm.segment.sam import ViTConfig

LayerFactory = Callable[[SamVisionConfig, int], nn.Module]


class ChannelSpatialAdapter(nn.Module):
    """SAM-Med2D's ``Adapter_Layer``: a channel gate (squeeze-excitation), then a stride-2 conv /
    transposed-conv pair, with a skip connection and a closing LayerNorm. Needs an even token grid."""

    def __init__(self, dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.norm = nn.LayerNorm(dim)
        self.channel = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False), nn.Sigmoid()
        )
        self.spatial = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=4, stride=2, padding=1, bias=False),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        channels_first = x.permute(0, 3, 1, 2)
        gate = self.channel(channels_first.mean(dim=(2, 3)))[:, :, None, None]
        mixed = channels_first + self.spatial(gate * channels_first)
        return self.norm(mixed.permute(0, 2, 3, 1))


class BottleneckAdapter(nn.Module):
    """MSA's ``Adapter``: ``D_fc2(GELU(D_fc1(x)))`` of width ``ratio * dim``, optionally plus ``x``."""

    def __init__(self, dim: int, ratio: float = 0.25, skip_connect: bool = True) -> None:
        super().__init__()
        self.skip_connect = skip_connect
        self.D_fc1 = nn.Linear(dim, int(dim * ratio))
        self.act = nn.GELU()
        self.D_fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x: Tensor) -> Tensor:
        out = self.D_fc2(self.act(self.D_fc1(x)))
        return x + out if self.skip_connect else out


class LoRAQKVLinear(nn.Linear):
    """SAM's fused ``qkv`` Linear (C -> 3C) plus rank-r updates of its q and v outputs.

    ``qkv(x) + [B_q A_q x, 0, B_v A_v x]``, as SAMed's ``_LoRA_qkv``. ``w_a_*`` are (r, C) and
    ``w_b_*`` (C, r); ``reset_lora`` gives LoRA's training start (A Kaiming-uniform, B zero).
    peft's LoRA does not fit here: it adapts a Linear's whole output, not two thirds of it.
    """

    def __init__(self, dim: int, rank: int, bias: bool = True) -> None:
        super().__init__(dim, 3 * dim, bias=bias)
        self.rank = rank
        self.w_a_q = nn.Parameter(torch.zeros(rank, dim))
        self.w_b_q = nn.Parameter(torch.zeros(dim, rank))
        self.w_a_v = nn.Parameter(torch.zeros(rank, dim))
        self.w_b_v = nn.Parameter(torch.zeros(dim, rank))

    def reset_lora(self) -> None:
        for a, b in ((self.w_a_q, self.w_b_q), (self.w_a_v, self.w_b_v)):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def forward(self, x: Tensor) -> Tensor:
        qkv = F.linear(x, self.weight, self.bias)
        delta_q = F.linear(F.linear(x, self.w_a_q), self.w_b_q)
        delta_v = F.linear(F.linear(x, self.w_a_v), self.w_b_v)
        return qkv + torch.cat([delta_q, torch.zeros_like(delta_q), delta_v], dim=-1)


def _no_depth(depth: int | None, what: str) -> None:
    if depth is not None:
        raise ValueError(f"{what} is a 2D model: it has no depth adapter for 3D chunks")


class SamMed2DLayer(SamVisionLayer):
    """A SAM ViT block with SAM-Med2D's Adapter beside the MLP."""

    def __init__(self, config: SamVisionConfig, window_size: int, adapter_ratio: float = 0.25) -> None:
        super().__init__(config, window_size)
        self.Adapter = ChannelSpatialAdapter(config.hidden_size, adapter_ratio)

    def forward(self, hidden_states: Tensor, depth: int | None = None) -> Tensor:  # type: ignore[override]
        _no_depth(depth, "SAM-Med2D")
        x = self.layer_norm1(hidden_states)
        if self.window_size > 0:
            height, width = x.shape[1], x.shape[2]
            x, padded = self.window_partition(x, self.window_size)
        x, _ = self.attn(hidden_states=x)
        if self.window_size > 0:
            x = self.window_unpartition(x, self.window_size, padded, (height, width))
        x = hidden_states + x
        normed = self.layer_norm2(x)
        return x + self.mlp(normed) + self.Adapter(normed)


def closest_factors(n: int) -> tuple[int, int]:
    """MSA's ``closest_numbers``: the depth grid ``(a, b)``, ``a * b == n``, searched from
    ``(isqrt(n), isqrt(n) + 1)`` by growing b or shrinking a; b > a always (16 -> (2, 8), not (4, 4))."""
    if n < 2:
        raise ValueError(f"the depth branch needs a chunk of at least 2 slices, got {n} (MSA's search never ends for 1)")
    a = math.isqrt(n)
    b = a + 1
    while a * b != n:
        if a * b < n:
            b += 1
        else:
            a -= 1
    return a, b


class MSALayer(SamVisionLayer):
    """A SAM ViT block with MSA's Space, MLP and Depth adapters.

    ``depth`` (the number of slices D of a 3D chunk, the batch being chunks x D slices in
    slice-minor order) switches on the depth branch: the block's own attention, applied across
    the D slices laid out as a (a, b) grid with a * b = D, then the Depth adapter, added to the
    spatial branch. As in MSA, the branch regroups the (window-partitioned, in windowed blocks)
    batch rows in consecutive runs of D, so in windowed blocks it mixes windows and slices exactly
    as the original code does; a 2D image (``depth=None``) skips it.
    """

    def __init__(
        self, config: SamVisionConfig, window_size: int, adapter_ratio: float = 0.25, adapter_scale: float = 0.5
    ) -> None:
        super().__init__(config, window_size)
        dim = config.hidden_size
        self.MLP_Adapter = BottleneckAdapter(dim, adapter_ratio, skip_connect=False)
        self.Space_Adapter = BottleneckAdapter(dim, adapter_ratio)
        self.Depth_Adapter = BottleneckAdapter(dim, adapter_ratio, skip_connect=False)
        self.adapter_scale = adapter_scale

    def forward(self, hidden_states: Tensor, depth: int | None = None) -> Tensor:  # type: ignore[override]
        x = hidden_states
        if self.window_size > 0:
            height, width = x.shape[1], x.shape[2]
            x, padded = self.window_partition(x, self.window_size)
        if depth is not None:
            across = self._depth_branch(x, depth)
        x, _ = self.attn(hidden_states=self.layer_norm1(x))
        x = self.Space_Adapter(x)
        if depth is not None:
            x = x + across
        if self.window_size > 0:
            x = self.window_unpartition(x, self.window_size, padded, (height, width))
        x = hidden_states + x
        normed = self.layer_norm2(x)
        return x + self.mlp(normed) + self.adapter_scale * self.MLP_Adapter(normed)

    def _depth_branch(self, x: Tensor, depth: int) -> Tensor:
        rows, h, w, c = x.shape
        grid_h, grid_w = closest_factors(depth)
        if rows % depth:
            raise ValueError(f"a batch of {rows} rows is not a whole number of {depth}-slice chunks")
        # '(b d) h w c -> (b h w) d c', normalise, then lay the d slices out as a grid_h x grid_w image
        tokens = x.reshape(rows // depth, depth, h, w, c).permute(0, 2, 3, 1, 4).reshape(-1, depth, c)
        tokens = self.layer_norm1(tokens).reshape(-1, grid_h, grid_w, c)
        attended, _ = self.attn(hidden_states=tokens)
        across = self.Depth_Adapter(attended)
        # '(b n) dh dw c -> (b dh dw) n c' with n = h * w, then back to (rows, h, w, c)
        return across.reshape(rows // depth, h * w, depth, c).permute(0, 2, 1, 3).reshape(rows, h, w, c)


def _lora_layer(config: SamVisionConfig, window_size: int, rank: int) -> SamVisionLayer:
    layer = SamVisionLayer(config, window_size)
    layer.attn.qkv = LoRAQKVLinear(config.hidden_size, rank, bias=config.qkv_bias)
    return layer


class AdaptedViTEncoder(nn.Module):
    """SAM's ViT image encoder built from a block factory; SamCore's key names (``patch_embed``,
    ``pos_embed``, ``layers.N``, ``neck``). ``pos_grid`` sizes ``pos_embed`` when it is kept at
    another grid than the input's (MSA); it is then bicubically resized on every forward."""

    def __init__(self, vision_config: SamVisionConfig, make_layer: LayerFactory, pos_grid: int | None = None) -> None:
        super().__init__()
        config = copy.deepcopy(vision_config)
        config._attn_implementation = "sdpa"
        self.config = config
        grid = pos_grid or config.image_size // config.patch_size
        self.patch_embed = SamPatchEmbeddings(config)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.hidden_size))
        self.layers = nn.ModuleList(
            make_layer(config, 0 if i in config.global_attn_indexes else config.window_size)
            for i in range(config.num_hidden_layers)
        )
        self.neck = SamVisionNeck(config)

    def forward(self, pixel_values: Tensor, depth: int | None = None) -> Tensor:
        """(B, 3, S, S) -> (B, C, E, E); ``depth`` marks the batch as 3D chunks of that many slices."""
        x = self.patch_embed(pixel_values)
        pos = self.pos_embed
        if pos.shape[1:3] != x.shape[1:3]:
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic", align_corners=False)
            pos = pos.permute(0, 2, 3, 1)
        x = x + pos
        for layer in self.layers:
            x = layer(x) if depth is None else layer(x, depth=depth)
        return self.neck(x)


@dataclass(frozen=True)
class SamMed2DViTConfig(ViTConfig):
    """SAM's ViT with SAM-Med2D's Adapter in every block (hidden width ``adapter_ratio * C``)."""

    adapter_ratio: float = 0.25

    def build_encoder(self, vision_config: SamVisionConfig) -> AdaptedViTEncoder:
        return AdaptedViTEncoder(vision_config, lambda c, w: SamMed2DLayer(c, w, self.adapter_ratio))


@dataclass(frozen=True)
class MSAViTConfig(ViTConfig):
    """SAM's ViT with MSA's adapters; ``pretrain_grid`` sizes pos_embed and the global blocks'
    relative positions (64: SAM's 1024 px grid, whatever the input size)."""

    adapter_ratio: float = 0.25
    adapter_scale: float = 0.5
    pretrain_grid: int = 64

    def build_encoder(self, vision_config: SamVisionConfig) -> AdaptedViTEncoder:
        rel_config = copy.deepcopy(vision_config)
        rel_config.image_size = self.pretrain_grid * self.patch_size  # only sizes the global rel-pos tables
        rel_config._attn_implementation = "sdpa"

        def make(config: SamVisionConfig, window: int) -> MSALayer:
            return MSALayer(rel_config, window, self.adapter_ratio, self.adapter_scale)

        return AdaptedViTEncoder(vision_config, make, pos_grid=self.pretrain_grid)


@dataclass(frozen=True)
class LoRAViTConfig(ViTConfig):
    """SAM's ViT with SAMed's rank-``lora_rank`` LoRA on the q and v projections of every block."""

    lora_rank: int = 4

    def build_encoder(self, vision_config: SamVisionConfig) -> AdaptedViTEncoder:
        return AdaptedViTEncoder(vision_config, lambda c, w: _lora_layer(c, w, self.lora_rank))
