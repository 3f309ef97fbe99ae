"""TinyViT image encoder in the form LiteMedSAM uses it.

LiteMedSAM (bowang-lab, 2024) distils MedSAM's ViT-B into MobileSAM's TinyViT-5M, changed to give
SAM's 64x64 embedding from a 256x256 input instead of a 1024x1024 one:

- the patch embedding is two 1x1 Conv+BN layers with GELU between them, stride 1 (TinyViT's own is
  two 3x3 stride-2 convolutions), so stage 0 runs at full input resolution;
- stage 0 is MBConv blocks (1x1 expand, 3x3 depthwise, 1x1 project, all Conv+BN, GELU, residual
  before the last GELU); stages 1.. are TinyViT blocks (windowed attention with learned
  attention-bias tables, a 3x3 depthwise Conv+BN that is *not* residual, pre-norm MLP);
- every stage but the last ends in a patch merging (1x1, 3x3 depthwise, 1x1 Conv+BN, GELU after the
  first two) that halves the resolution, except the merge into the last stage, which keeps it
  (MobileSAM's ``stride_c = 1`` for out_dim 320/448/576), so the overall stride is 4;
- SAM's neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d, no biases) maps the last stage to 256
  channels.

For LiteMedSAM: dims (64, 128, 160, 320), depths (2, 2, 6, 2), heads (-, 4, 5, 10), windows
(-, 7, 14, 7), mlp ratio 4, MBConv expand ratio 4; resolutions 256, 128, 64, 64.
Parameter names equal those of LiteMedSAM's checkpoint under ``image_encoder.``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class TinyViTConfig:
    """Hyperparameters of the TinyViT encoder body; the defaults are LiteMedSAM's.

    ``num_heads[0]`` and ``window_sizes[0]`` belong to the convolutional stage and are unused.
    """

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3

    @property
    def stride(self) -> int:
        """Input pixels per embedding cell: every merge halves, except the last one."""
        return 2 ** (len(self.embed_dims) - 2)


class ConvBN(nn.Sequential):
    """Bias-free Conv2d followed by BatchNorm2d (TinyViT's ``Conv2d_BN``: keys ``c`` and ``bn``)."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module(
            "c",
            nn.Conv2d(in_chans, out_chans, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        )
        bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) tensor, as in segment-anything's neck (eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    """Two 1x1 Conv+BN layers with GELU between them; keeps the input resolution."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_chans, embed_dim // 2), nn.GELU(), ConvBN(embed_dim // 2, embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block of the convolutional stage, on (B, C, H, W)."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, kernel_size=3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, bn_weight_init=0.0)  # the block starts as the identity

    def forward(self, x: Tensor) -> Tensor:
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Changes the width and (with stride 2) halves the resolution; returns tokens (B, H*W, C)."""

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, kernel_size=3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:  # tokens from an attention stage
            h, w = self.resolution
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.conv3(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention over one window, with TinyViT's learned attention biases.

    Each head has one bias per relative offset (|dy|, |dx|) inside the window, so the table holds
    ``window**2`` entries per head; ``attention_bias_idxs[i, j]`` is the table index of the offset
    between window positions i and j (``|dy| * window + |dx|``, the order in which LeViT/TinyViT's
    enumeration first meets each offset). The query/key/value projection is laid out per head
    as [q | k | v], not as [all q | all k | all v].
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self.register_buffer("attention_bias_idxs", attention_bias_index(window_size), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.head_dim, dim=3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))


def attention_bias_index(window_size: int) -> Tensor:
    """(window**2, window**2) table index of the offset (|dy|, |dx|) between two window positions."""
    ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :]).abs() * window_size + (xs[:, None] - xs[None, :]).abs()


class Mlp(nn.Module):
    """Pre-norm MLP: LayerNorm, Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (residual), depthwise Conv+BN (not residual), MLP (residual); on (B, H*W, C).

    The feature map is zero-padded on the bottom/right to whole windows *before* the attention's
    LayerNorm, so padded cells take part in the attention as keys, exactly as in TinyViT.
    """

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, kernel_size=local_conv_size, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        h, w = self.resolution
        b, n, c = x.shape
        x = x + self._window_attention(x.view(b, h, w, c)).reshape(b, n, c)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        return x + self.mlp(x)

    def _window_attention(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        pad_b, pad_r = -h % ws, -w % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        windows = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = self.attn(windows).view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        return x[:, :h, :w]


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks on (B, C, H, W), then a patch merging."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class AttentionStage(nn.Module):
    """Stages 1..: TinyViT blocks on tokens (B, H*W, C), then a patch merging unless last."""

    def __init__(self, blocks: list[TinyViTBlock], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """TinyViT image encoder with SAM's neck: (B, 3, S, S) -> (B, out_chans, S/stride, S/stride)."""

    def __init__(self, config: TinyViTConfig, image_size: int, out_chans: int = 256, in_chans: int = 3) -> None:
        super().__init__()
        dims, num_stages = config.embed_dims, len(config.embed_dims)
        if num_stages < 2 or not (
            len(config.depths) == len(config.num_heads) == len(config.window_sizes) == num_stages
        ):
            raise ValueError(f"inconsistent TinyViT stage lists in {config}")
        if image_size % config.stride:
            raise ValueError(f"image size {image_size} is not a multiple of the encoder stride {config.stride}")
        self.image_size = image_size
        self.embedding_size = image_size // config.stride
        self.patch_embed = PatchEmbed(in_chans, dims[0])

        self.layers = nn.ModuleList()
        size = image_size
        for i in range(num_stages):
            resolution = (size, size)
            downsample = None
            if i < num_stages - 1:
                stride = 1 if i == num_stages - 2 else 2
                downsample = PatchMerging(resolution, dims[i], dims[i + 1], stride)
                size = (size - 1) // stride + 1
            if i == 0:
                self.layers.append(ConvStage(dims[0], config.depths[0], config.mbconv_expand_ratio, downsample))
            else:
                blocks = [
                    TinyViTBlock(
                        dims[i],
                        resolution,
                        config.num_heads[i],
                        config.window_sizes[i],
                        config.mlp_ratio,
                        config.local_conv_size,
                    )
                    for _ in range(config.depths[i])
                ]
                self.layers.append(AttentionStage(blocks, downsample))
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        for module in self.layers.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, self.embedding_size, self.embedding_size)
        return self.neck(x)
