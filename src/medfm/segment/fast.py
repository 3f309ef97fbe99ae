"""Fast inference paths for SAM-family networks on the CPU: same weights, same masks, less time.

The training-shaped modules (`medfm.segment.tinyvit`, transformers' SAM decoder) are written for
readability, for loading the published checkpoints unchanged, and for training. For inference,
:class:`InferenceEngine` (what `Predictor` uses unless ``optimize=False``) builds two read-only
companions next to them, without touching the network's parameters or its state-dict layout:

* :class:`FastTinyViT`: LiteMedSAM's encoder with every BatchNorm folded into its convolution,
  channels-last activations, GELU (and the residual add) fused into oneDNN's convolution and
  linear kernels (the ops torch.compile's CPU backend emits, called directly: no compile step),
  the attention scale folded into q, padded attention windows not pushed through LayerNorm and
  qkv (a zero cell's LayerNorm is the bias, so its qkv is one constant row) and the output
  projection applied to the real cells only.
* :class:`FastDecoder`: SAM's two-way transformer and mask head with everything that does not
  depend on the prompt cached once per image (dense positional encoding, image embedding +
  no-mask embedding, the first layer's projections of the image tokens); the attentions between
  the few prompt tokens and the E*E image tokens re-associated so that no image-token
  projection runs per prompt (``softmax(q (X Wk)^T) X Wv = softmax((q Wk) X^T) (X Wv)``, the
  image-to-token output projection folded into the token values); the final attention only for
  the tokens that are read; the mask upscaling as products on the embedding cells (the stride-2
  2x2 transposed convolutions are local: no pixel shuffle) and only for the returned masks;
  prompts in chunks of two, so that each prompt's image tokens stay in the CPU caches; the
  prompt-token side (tiny products) on one thread, where a thread hand-off costs more than the
  work, above all on a shared machine.

``precision="fp32"`` (the default) keeps the arithmetic in float32: results equal the plain
modules' up to float32 re-association (tests/test_speed_paths.py checks them against a float64 run;
low-res logits of the real LiteMedSAM within ~1e-4) and tests/test_parity.py passes on this path.
``precision="bf16"`` (opt-in; CPUs with native bfloat16, AVX512-BF16 or AMX) runs the encoder and
the decoder's image-token products in bfloat16 with float32 accumulation: about twice as fast, the
embedding moves by ~5% of its range and low-res logits by up to ~0.5, which flips boundary pixels
(on the benchmark's 20 images: mean Dice against the ground truth within 0.001 of float32's).
benchmarks/litemedsam_speed.py measures both against the reference package.

Anything the fast paths do not know (another encoder, an adapter or LoRA wrapped into the encoder
or the decoder, a network in training mode, a non-CPU device for the encoder) makes them step
aside: :class:`InferenceEngine` then calls the plain ``SamCore.encode`` / ``SamCore.decode``. A
change to any parameter after the engine was built (a training step, ``load_state_dict``) is
noticed through the tensors' version counters and the companions are rebuilt.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfm.errors import OptionError
from medfm.segment import tinyvit as tv
from medfm.segment.options import check_precision_name
from medfm.segment.sam import SamCore

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@functools.cache
def _has_mkldnn_ops() -> bool:
    """oneDNN's fused convolution/linear ops (what torch.compile's CPU backend calls) are available."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 matrix products natively (AVX512-BF16 or AMX); oneDNN would
    emulate them on other AVX-512 CPUs, slower than float32."""
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:
        return False
    return bool(native) and _has_mkldnn_ops()


def check_precision(precision: str) -> str:
    """Raise `OptionError` unless ``precision`` is known and runs on this machine."""
    check_precision_name(precision)
    if precision == "bf16" and not bf16_supported():
        raise OptionError("precision 'bf16' needs a CPU with native bfloat16 (AVX512-BF16 or AMX) and oneDNN")
    return precision


def _version(tensor: Tensor) -> int:
    """The in-place modification counter (inference tensors have none: -1)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


def _fingerprint(*modules: nn.Module, known: tuple[type, ...] | None = None) -> tuple | None:
    """Changes whenever a parameter or buffer is replaced or modified in place (training, loading),
    or a submodule is swapped; None when a submodule's type is not in ``known`` (one walk, as this
    runs on every prompt)."""
    key: list = []
    for module in modules:
        for m in module.modules():
            if known is not None and type(m) not in known:
                return None
            key.append(id(m))
            for tensors in (m._parameters, m._buffers):
                for t in tensors.values():
                    if t is not None:
                        key.append((id(t), _version(t)))
    return tuple(key)


# ------------------------------------------------------------------------------------ encoder
def _fold(conv_bn: tv.ConvBN, dtype: torch.dtype) -> _Conv:
    conv, bn = conv_bn.c, conv_bn.bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale[:, None, None, None]
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return _Conv(weight, bias, conv.stride, conv.padding, conv.groups, dtype)


class _Conv:
    """A convolution with its bias, run through oneDNN with an optional fused GELU or residual add."""

    def __init__(self, weight: Tensor, bias: Tensor | None, stride, padding, groups: int, dtype: torch.dtype) -> None:
        self.weight = weight.detach().to(dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self.stride = list(stride)
        self.padding = list(padding)
        self.groups = groups

    def __call__(self, x: Tensor, gelu: bool = False, add: Tensor | None = None) -> Tensor:
        args = (self.weight, self.bias, self.padding, self.stride, [1, 1], self.groups)
        if add is not None:
            return torch.ops.mkldnn._convolution_pointwise.binary(x, add, *args, "add", None, None, [], None)
        return torch.ops.mkldnn._convolution_pointwise(x, *args, "gelu" if gelu else "none", [], "none" if gelu else "")


class _Linear:
    """A linear layer through oneDNN, with an optional fused GELU or residual add."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, row_scale: Tensor | None = None) -> None:
        weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
        if row_scale is not None:  # scales output features (e.g. the attention scale into q)
            weight = weight * row_scale[:, None]
            bias = None if bias is None else bias * row_scale
        self.weight = weight.to(dtype).contiguous()
        self.bias = None if bias is None else bias.to(dtype).contiguous()

    def __call__(self, x: Tensor, gelu: bool = False, add: Tensor | None = None) -> Tensor:
        if add is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, add, self.weight, self.bias, "add")
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _layer_norm(module: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
    return module.weight.detach().to(dtype), module.bias.detach().to(dtype), float(module.eps)


#: The module types FastTinyViT knows; anything else inside the encoder (an adapter, LoRA) disables it.
_TINYVIT_TYPES = (
    tv.TinyViT, tv.PatchEmbed, tv.ConvBN, tv.MBConv, tv.PatchMerging, tv.Attention, tv.Mlp, tv.TinyViTBlock,
    tv.ConvStage, tv.AttentionStage, tv.LayerNorm2d, nn.Conv2d, nn.BatchNorm2d, nn.GELU, nn.LayerNorm, nn.Linear,
    nn.Sequential, nn.ModuleList,
)


def fast_tinyvit_supported(encoder: nn.Module) -> bool:
    """True for a plain TinyViT in eval mode (exact module types, nothing wrapped in)."""
    if not isinstance(encoder, tv.TinyViT) or encoder.training or not _has_mkldnn_ops():
        return False
    if any(type(m) not in _TINYVIT_TYPES for m in encoder.modules()):
        return False
    return all(
        type(m.seq[1]) is nn.GELU for m in encoder.modules() if isinstance(m, tv.PatchEmbed)
    ) and all(type(m.c) is nn.Conv2d and type(m.bn) is nn.BatchNorm2d for m in encoder.modules() if isinstance(m, tv.ConvBN))


class _Merge:
    def __init__(self, merge: tv.PatchMerging, dtype: torch.dtype) -> None:
        self.conv1, self.conv2, self.conv3 = (_fold(c, dtype) for c in (merge.conv1, merge.conv2, merge.conv3))

    def __call__(self, x: Tensor) -> Tensor:
        """(B, C, H, W) channels-last -> (B, H'W', C') tokens."""
        x = self.conv3(self.conv2(self.conv1(x, gelu=True), gelu=True))
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


class _Block:
    """One TinyViT block on tokens (B, H*W, C)."""

    def __init__(self, block: tv.TinyViTBlock, dtype: torch.dtype) -> None:
        attn = block.attn
        self.resolution = block.resolution
        self.window = block.window_size
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        self.norm = _layer_norm(attn.norm, dtype)
        # the attention scale is folded into the q rows of qkv (per head laid out as [q | k | v])
        row_scale = torch.ones(attn.num_heads, 3, attn.head_dim)
        row_scale[:, 0] = attn.scale
        self.qkv = _Linear(attn.qkv, dtype, row_scale.flatten().to(attn.qkv.weight))
        self.proj = _Linear(attn.proj, dtype)
        with torch.no_grad():
            # a zero-padded cell's LayerNorm output is the LayerNorm bias; its qkv is one constant row
            self.pad_qkv = self.qkv(attn.norm.bias.detach().to(dtype)[None])
            self.bias = attn.attention_biases[:, attn.attention_bias_idxs].detach().to(dtype).contiguous()
        self.local_conv = _fold(block.local_conv, dtype)
        self.mlp_norm = _layer_norm(block.mlp.norm, dtype)
        self.fc1, self.fc2 = _Linear(block.mlp.fc1, dtype), _Linear(block.mlp.fc2, dtype)

    def __call__(self, x: Tensor) -> Tensor:
        h, w = self.resolution
        b, n, c = x.shape
        ws, heads, hd = self.window, self.heads, self.head_dim
        qkv = self.qkv(F.layer_norm(x, (c,), *self.norm)).view(b, h, w, 3 * c)
        pad_b, pad_r = -h % ws, -w % ws
        if pad_b or pad_r:
            padded = self.pad_qkv.view(1, 1, 1, 3 * c).expand(b, h + pad_b, w + pad_r, 3 * c).clone()
            padded[:, :h, :w] = qkv
            qkv = padded
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        # windows, heads: (B*nW, heads, ws*ws, 3*hd), per head laid out as [q | k | v]
        qkv = qkv.view(b, nh, ws, nw, ws, heads, 3 * hd).permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, heads, ws * ws, 3 * hd)
        q, k, v = qkv.split(hd, dim=3)
        out = (q @ k.transpose(-2, -1)).add_(self.bias).softmax(dim=-1) @ v
        out = out.view(b, nh, nw, heads, ws, ws, hd).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, ph, pw, c)
        if pad_b or pad_r:
            out = out[:, :h, :w]
        x = self.proj(out.reshape(b * n, c), add=x.reshape(b * n, c))
        x = self.local_conv(x.view(b, h, w, c).permute(0, 3, 1, 2))  # channels-last view, no copy
        x = x.permute(0, 2, 3, 1).reshape(b * n, c)
        hidden = self.fc1(F.layer_norm(x, (c,), *self.mlp_norm), gelu=True)
        return self.fc2(hidden, add=x).view(b, n, c)


class FastTinyViT:
    """Inference-only TinyViT (see the module docstring); ``__call__`` returns float32 (B, 256, E, E).

    Built from a plain `TinyViT` with `fast_tinyvit_supported`; holds its own (folded, cast) copies of
    the weights, so it never changes the encoder it came from.
    """

    @torch.no_grad()
    def __init__(self, encoder: tv.TinyViT, precision: str = "fp32") -> None:
        if not fast_tinyvit_supported(encoder):
            raise ValueError("FastTinyViT needs a plain TinyViT in eval mode")
        self.dtype = dtype = _DTYPES[check_precision(precision)]
        self.embedding_size = encoder.embedding_size
        seq = encoder.patch_embed.seq
        self.embed1, self.embed2 = _fold(seq[0], dtype), _fold(seq[2], dtype)
        stage0 = encoder.layers[0]
        self.mbconvs = [tuple(_fold(c, dtype) for c in (blk.conv1, blk.conv2, blk.conv3)) for blk in stage0.blocks]
        self.merge0 = _Merge(stage0.downsample, dtype)
        self.stages = [
            ([_Block(blk, dtype) for blk in stage.blocks], None if stage.downsample is None else _Merge(stage.downsample, dtype))
            for stage in encoder.layers[1:]
        ]
        neck = encoder.neck
        self.neck1 = _Conv(neck[0].weight, neck[0].bias, neck[0].stride, neck[0].padding, 1, dtype)
        self.neck_norm1 = _layer_norm(neck[1], dtype)
        self.neck2 = _Conv(neck[2].weight, neck[2].bias, neck[2].stride, neck[2].padding, 1, dtype)
        self.neck_norm2 = _layer_norm(neck[3], torch.float32)

    #: MBConv in strips of this many rows: the 4x wider hidden activation (256 channels at full
    #: resolution, 32-64 MB) then stays in the CPU caches; ~1.8x faster in float32 on a 2-core EPYC
    strip_rows = 16

    def _mbconv(self, x: Tensor, conv1: _Conv, conv2: _Conv, conv3: _Conv) -> Tensor:
        """GELU(x + conv3(GELU(dwconv2(GELU(conv1(x)))))) on (B, C, H, W) channels-last."""
        height, rows = x.shape[2], self.strip_rows
        if height <= 2 * rows or conv2.padding[0] != 1 or conv2.stride != [1, 1]:
            return F.gelu(conv3(conv2(conv1(x, gelu=True), gelu=True), add=x))
        strips = []
        for top in range(0, height, rows):
            bottom = min(height, top + rows)
            # conv1 on the strip and one halo row each side; outside the image the depthwise conv
            # sees zeros (its padding), not conv1 of zeros
            hidden = conv1(x[:, :, max(0, top - 1) : bottom + 1], gelu=True)
            if top == 0 or bottom == height:
                hidden = F.pad(hidden, (0, 0, int(top == 0), int(bottom == height))).contiguous(memory_format=torch.channels_last)
            hidden = torch.ops.mkldnn._convolution_pointwise(
                hidden, conv2.weight, conv2.bias, [0, conv2.padding[1]], [1, 1], [1, 1], conv2.groups, "gelu", [], "none"
            )
            strips.append(F.gelu(conv3(hidden, add=x[:, :, top:bottom])))
        return torch.cat(strips, dim=2)

    @torch.no_grad()
    def __call__(self, pixels: Tensor) -> Tensor:
        x = pixels.to(self.dtype).contiguous(memory_format=torch.channels_last)
        x = self.embed2(self.embed1(x, gelu=True))
        for convs in self.mbconvs:
            x = self._mbconv(x, *convs)
        x = self.merge0(x)  # tokens from here on
        for blocks, merge in self.stages:
            for block in blocks:
                x = block(x)
            if merge is not None:
                b, n, c = x.shape
                side = math.isqrt(n)
                x = merge(x.view(b, side, side, c).permute(0, 3, 1, 2))
        b, n, c = x.shape
        e = self.embedding_size
        x = self.neck1(x.view(b, e, e, c).permute(0, 3, 1, 2))  # channels-last (B, 256, E, E)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), *self.neck_norm1).permute(0, 3, 1, 2)
        x = self.neck2(x).float()
        return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), *self.neck_norm2).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------ decoder
@dataclass
class ImageCache:
    """What the decoder needs of one image embedding, whatever the prompt (see `FastDecoder.prepare`).

    Image-side tensors are in the decoder's compute dtype; ``S = E*E`` image tokens.
    """

    embedding: Tensor  # (1, C, E, E), the tensor it was built from
    tokens: Tensor  # (1, S, C) image embedding + no-mask embedding
    tokens_pe: Tensor  # tokens + dense positional encoding
    first_keys: Tensor  # (1, heads, head_dim, S): layer 0 token->image keys, scaled, transposed
    first_values: Tensor  # (1, heads, S, head_dim): layer 0 token->image values
    first_queries: Tensor  # (1, heads, head_dim, S): layer 0 image->token queries, transposed


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool = False) -> Tensor:
    """``F.linear`` (+ exact GELU), fused in oneDNN on the CPU."""
    if x.device.type == "cpu" and _has_mkldnn_ops():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
    out = F.linear(x, weight, bias)
    return F.gelu(out) if gelu else out


def _heads(x: Tensor, heads: int) -> Tensor:
    """(N, T, heads * d) -> (N, heads, T, d)."""
    n, t, c = x.shape
    return x.view(n, t, heads, c // heads).transpose(1, 2)


class _Threads:
    """Runs the prompt-token side (tiny products) on one thread and the image side on all.

    With two or more threads every tiny op pays a thread hand-off, ~10x its work, and far more on a
    shared machine where the other thread waits for a time slice (2.5x faster decoding measured
    there; the same speed on an idle machine). CPU only; restores the count. The count is
    process-wide, so a program decoding in one Python thread while running torch in another may
    set ``FastDecoder.single_thread_tokens = False``.
    """

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.threads = torch.get_num_threads()
        self.active = enabled and device.type == "cpu" and self.threads > 1

    def few(self) -> None:
        if self.active:
            torch.set_num_threads(1)

    def all(self) -> None:
        if self.active:
            torch.set_num_threads(self.threads)


class _Attention:
    """A SamAttention's weights, split per head for the re-associated products."""

    def __init__(self, attn: nn.Module) -> None:
        self.module = attn
        self.heads = heads = attn.num_attention_heads
        self.internal = attn.internal_dim
        self.head_dim = d = attn.internal_dim // heads
        self.scaling = attn.scaling
        self.wq = attn.q_proj.weight.detach().view(heads, d, -1)
        self.bq = attn.q_proj.bias.detach().view(heads, d)
        self.wk = attn.k_proj.weight.detach().view(heads, d, -1)
        self.wv = attn.v_proj.weight.detach().view(heads, d, -1)
        self.bv = attn.v_proj.bias.detach().view(heads, 1, d)
        self.wo = attn.out_proj.weight.detach().view(-1, heads, d)
        self.bo = attn.out_proj.bias.detach()

    def reassociate(self, tokens: int) -> bool:
        """Whether products with the few tokens beat projecting all image tokens."""
        return self.heads * tokens < self.internal


@functools.cache
def _decoder_types() -> tuple[type, ...]:
    from transformers.activations import GELUActivation
    from transformers.models.sam import modeling_sam as sam

    return (
        sam.SamMaskDecoder, sam.SamTwoWayTransformer, sam.SamTwoWayAttentionBlock, sam.SamAttention, sam.SamMLPBlock,
        sam.SamFeedForward, sam.SamLayerNorm, sam.SamPromptEncoder, sam.SamPositionalEmbedding, sam.SamMaskEmbedding,
        GELUActivation, nn.GELU, nn.ReLU, nn.Linear, nn.LayerNorm, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding, nn.ModuleList,
    )


def fast_decoder_supported(core: nn.Module) -> bool:
    """True for transformers' SAM prompt encoder and mask decoder in eval mode, nothing wrapped in
    (a LoRA on the decoder's projections, say, makes the plain decoder run)."""
    parts = (getattr(core, "mask_decoder", None), getattr(core, "prompt_encoder", None))
    if any(part is None or part.training for part in parts):
        return False
    known = _decoder_types()
    if type(parts[0]) is not known[0] or type(parts[1]) is not known[7]:
        return False
    if getattr(type(core), "prompt_embeddings", None) is not SamCore.prompt_embeddings:
        return False  # a prompt generator (AutoSAM) replaces the prompt embeddings
    return all(type(m) in known for part in parts for m in part.modules())


class FastDecoder:
    """SAM's prompt decoding for N prompts on one image, with per-image caching (module docstring).

    Holds views of the decoder's weights and re-laid-out copies of the mask head's (and in bf16 of
    the token MLPs'), taken at construction: `InferenceEngine` rebuilds it when a parameter
    changes; built by hand, build it again after changing weights.
    """

    #: run the prompt-token side on one thread (see `_Threads`)
    single_thread_tokens = True

    def __init__(self, core: nn.Module, precision: str = "fp32", chunk_size: int | None = None) -> None:
        if not fast_decoder_supported(core):
            raise ValueError("FastDecoder needs transformers' SAM prompt encoder and mask decoder, unwrapped, in eval mode")
        self.core = core
        self.decoder = decoder = core.mask_decoder
        self.transformer = transformer = decoder.transformer
        self.dtype = dt = _DTYPES[check_precision(precision)]
        self.size = core.config.embedding_size
        self.chunk_size = chunk_size or (2 if dt == torch.float32 else 4)  # measured best on a 2-core EPYC
        self._pe: tuple[tuple, Tensor, Tensor] | None = None
        self.layers = [
            (_Attention(layer.cross_attn_token_to_image), _Attention(layer.cross_attn_image_to_token), _layer_norm(layer.layer_norm4, dt))
            for layer in transformer.layers
        ]
        self.final = _Attention(transformer.final_attn_token_to_image)
        # the token MLPs (256 -> 2048 -> 256) read 4 MB of float32 weights per layer and prompt
        # batch; in bf16 mode their cast copies halve that
        self.mlps = [self._mlp(layer.mlp, dt) for layer in transformer.layers]
        conv1, conv2, norm = decoder.upscale_conv1, decoder.upscale_conv2, decoder.upscale_layer_norm
        with torch.no_grad():
            # ConvTranspose2d weight (in, out, ky, kx) -> a linear layer's (ky, kx, out) x in
            self.up1 = (conv1.weight.permute(2, 3, 1, 0).reshape(-1, conv1.in_channels).to(dt).contiguous(), conv1.bias.repeat(4).to(dt))
            self.up_norm = _layer_norm(norm, dt)
            self.up2 = (conv2.weight.permute(2, 3, 1, 0).reshape(-1, conv2.in_channels).to(dt).contiguous(), conv2.bias.repeat(4).to(dt))

    @staticmethod
    def _mlp(mlp: nn.Module, dtype: torch.dtype) -> Callable[[Tensor], Tensor] | nn.Module:
        if dtype == torch.float32 or type(mlp.act) is not nn.ReLU:
            return mlp
        w1, b1, w2, b2 = (t.detach().to(dtype) for t in (mlp.lin1.weight, mlp.lin1.bias, mlp.lin2.weight, mlp.lin2.bias))
        return lambda x: F.linear(torch.relu(F.linear(x.to(dtype), w1, b1)), w2, b2).float()

    # -- per image
    def positional_encoding(self) -> Tensor:
        """Dense positional encoding as tokens (1, S, C) float32, cached until the Gaussian matrix changes."""
        gaussian = self.core.prompt_encoder.shared_embedding.positional_embedding
        key = (id(gaussian), _version(gaussian), gaussian.device)
        if self._pe is None or self._pe[0] != key:
            with torch.no_grad():
                pe = self.core.dense_positional_embedding().flatten(2).transpose(1, 2).float().contiguous()
            self._pe = (key, pe, pe.to(self.dtype))
        return self._pe[1]

    @torch.no_grad()
    def prepare(self, embedding: Tensor) -> ImageCache:
        """The prompt-independent part of decoding one image embedding (1, C, E, E)."""
        no_mask = self.core.prompt_encoder.no_mask_embed.weight.float()
        tokens = (embedding.float().flatten(2).transpose(1, 2) + no_mask).contiguous()
        tokens_pe = tokens + self.positional_encoding()
        layer = self.transformer.layers[0]
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        heads, dt = t2i.num_attention_heads, self.dtype
        return ImageCache(
            embedding=embedding,
            tokens=tokens.to(dt),
            tokens_pe=tokens_pe.to(dt),
            first_keys=(_heads(t2i.k_proj(tokens_pe), heads) * t2i.scaling).transpose(-2, -1).to(dt).contiguous(),
            first_values=_heads(t2i.v_proj(tokens), heads).to(dt).contiguous(),
            first_queries=_heads(i2t.q_proj(tokens_pe), heads).transpose(-2, -1).to(dt).contiguous(),
        )

    # -- per prompt batch
    @torch.no_grad()
    def decode(
        self,
        cache: ImageCache,
        boxes: Tensor | None = None,
        points: Tensor | None = None,
        point_labels: Tensor | None = None,
        mask_input: Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """As `SamCore.decode`, on a prepared image; float32 results.

        Prompts go through in chunks of ``chunk_size`` (2 in float32, 4 in bf16): the per-prompt
        image tokens (S x C, 4 MB in float32) then stay in the CPU caches, which pays more than
        larger products do.
        """
        n = self.core._prompt_count(cache.embedding, boxes, points, point_labels, mask_input)
        threads = _Threads(cache.tokens.device, self.single_thread_tokens)
        try:
            parts = [
                self._decode(cache, *(None if x is None else x[i : i + self.chunk_size] for x in (boxes, points, point_labels, mask_input)),
                             multimask=multimask, threads=threads)
                for i in range(0, n, self.chunk_size)
            ] if (boxes, points, mask_input) != (None, None, None) else [self._decode(cache, None, None, None, None, multimask, threads)]
        finally:
            threads.all()
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _decode(
        self,
        cache: ImageCache,
        boxes: Tensor | None,
        points: Tensor | None,
        point_labels: Tensor | None,
        mask_input: Tensor | None,
        multimask: bool,
        threads: _Threads,
    ) -> tuple[Tensor, Tensor]:
        threads.few()
        f32, dt = torch.float32, self.dtype
        sparse, dense = self.core.prompt_encoder(
            input_points=None if points is None else points.to(f32)[:, None],
            input_labels=None if point_labels is None else point_labels[:, None],
            input_boxes=None if boxes is None else boxes.to(f32)[:, None],
            input_masks=None if mask_input is None else mask_input.to(f32),
        )
        decoder = self.decoder
        n = 1 if sparse is None else sparse.shape[0]
        if mask_input is not None:
            n = mask_input.shape[0]
        prompt = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0).expand(n, -1, -1)
        if sparse is not None:
            prompt = torch.cat([prompt, sparse[:, 0]], dim=1)
        prompt = prompt.contiguous()
        self.positional_encoding()
        pe = self._pe[2]
        if mask_input is None:
            image, image_pe, first = cache.tokens, cache.tokens_pe, cache
        else:
            threads.all()
            image = (cache.embedding.float() + dense).flatten(2).transpose(1, 2)
            image, image_pe, first = image.to(dt).contiguous(), (image + self._pe[1]).to(dt), None
            threads.few()

        queries = prompt
        for index, (layer, (t2i, i2t, norm4)) in enumerate(zip(self.transformer.layers, self.layers)):
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(queries[:, None], queries[:, None], queries[:, None])[0][:, 0]
            else:
                q = (queries + prompt)[:, None]
                queries = queries + layer.self_attn(q, q, queries[:, None])[0][:, 0]
            queries = layer.layer_norm1(queries)
            cached = first if index == 0 else None
            queries = layer.layer_norm2(queries + self._token_to_image(t2i, queries + prompt, image, image_pe, cached, threads))
            queries = layer.layer_norm3(queries + self.mlps[index](queries))
            image = self._image_to_token(i2t, image, image_pe, queries + prompt, queries, cached, threads)
            threads.all()
            image = F.layer_norm(image, (image.shape[-1],), *norm4)
            image_pe = image + pe
            threads.few()

        # the final attention treats each token alone: run it for the iou token and the mask
        # tokens that are returned only
        mask_ids = list(range(1, decoder.num_mask_tokens)) if multimask else [0]
        rows = [0] + [1 + i for i in mask_ids]
        final = self._token_to_image(self.final, (queries + prompt)[:, rows], image, image_pe, None, threads)
        queries = self.transformer.layer_norm_final_attn(queries[:, rows] + final)
        hyper = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 1 + j]) for j, i in enumerate(mask_ids)], dim=2)
        iou = decoder.iou_prediction_head(queries[:, 0])[:, mask_ids]
        threads.all()
        return self._upscale(image, hyper), iou

    def _token_to_image(
        self, a: _Attention, query: Tensor, image: Tensor, image_pe: Tensor, cached: ImageCache | None, threads: _Threads
    ) -> Tensor:
        """SamAttention(query=tokens, key=image + pe, value=image) for (N, T, C) tokens, (1 or N, S, C) image."""
        heads, dt = a.heads, image.dtype
        n, t, c = query.shape
        q = _heads(a.module.q_proj(query), heads)  # (N, h, T, d)
        if cached is not None:  # layer 0 without a mask prompt: keys and values cached per image
            threads.all()
            weights = torch.softmax(q.to(dt) @ cached.first_keys, dim=-1)
            out = (weights @ cached.first_values).float()  # (N, h, T, d)
            threads.few()
        elif a.reassociate(t):
            # (q Wk) (X + pe)^T, then (weights X) Wv^T + bv; q . bk is the same for every image
            # token of a row, which softmax ignores. The softmax runs over the last dimension (other
            # dimensions are ~10x less accurate in float32, and slow in bf16); in bf16 the scores
            # are first computed as (S, rows) and the small result transposed, as oneDNN's bf16
            # products would copy a transposed image operand.
            qk = torch.einsum("nhtd,hdc->nhtc", q * a.scaling, a.wk).reshape(n, heads * t, c).to(dt)
            threads.all()
            if dt == torch.float32:
                scores = qk @ image_pe.transpose(1, 2)  # (N, h*T, S)
            elif image.shape[0] == 1:
                scores = (image_pe[0] @ qk.reshape(n * heads * t, c).t()).t().contiguous().view(n, heads * t, -1)
            else:
                scores = torch.bmm(image_pe, qk.transpose(1, 2)).transpose(1, 2).contiguous()
            weights = torch.softmax(scores, dim=-1)
            if image.shape[0] == 1:
                mixed = (weights.reshape(n * heads * t, -1) @ image[0]).view(n, heads * t, c)
            else:
                mixed = weights @ image
            threads.few()
            out = torch.einsum("nhtc,hdc->nhtd", mixed.float().view(n, heads, t, c), a.wv) + a.bv
        else:
            threads.all()
            k = _heads(a.module.k_proj(image_pe.float()), heads)
            v = _heads(a.module.v_proj(image.float()), heads)
            out = torch.softmax((q * a.scaling) @ k.transpose(-2, -1), dim=-1) @ v
            threads.few()
        return a.module.out_proj(out.transpose(1, 2).reshape(n, t, -1))

    def _image_to_token(
        self, a: _Attention, image: Tensor, image_pe: Tensor, key: Tensor, value: Tensor, cached: ImageCache | None,
        threads: _Threads,
    ) -> Tensor:
        """``image + SamAttention(query=image + pe, key=tokens + pe, value=tokens)`` -> (N, S, C).

        Softmax runs over the few tokens on weights laid out (N, heads, T, S), S innermost, where it
        vectorises; the residual add comes with the output product.
        """
        heads, dt = a.heads, image.dtype
        n, t, _ = key.shape
        s, c = image.shape[1:]
        k = _heads(a.module.k_proj(key), heads) * a.scaling  # (N, h, T, d)
        v = _heads(a.module.v_proj(value), heads)
        reassociate = a.reassociate(t)
        if reassociate:
            # out_proj folded into the token values: sum_h weights_h^T (v_h Wo_h^T + bo / h) + bo,
            # since each head's weights sum to 1 over the tokens
            m = (torch.einsum("nhtd,chd->nhtc", v, a.wo) + a.bo / heads).reshape(n, heads * t, c).to(dt)
        if cached is not None:
            k = k.to(dt)
            threads.all()
            scores = k @ cached.first_queries  # (N, h, T, S)
        elif reassociate:
            # ((X + pe) Wq^T + bq) k^T per head: (X + pe) (k Wq)^T + (k . bq)
            g = torch.einsum("nhtd,hdc->nhtc", k, a.wq).reshape(n, heads * t, c).to(dt)
            bias = torch.einsum("nhtd,hd->nht", k, a.bq).reshape(n, 1, heads * t).to(dt)
            threads.all()
            if image.shape[0] == 1:
                scores = torch.addmm(bias.reshape(1, n * heads * t), image_pe[0], g.reshape(n * heads * t, c).t())
                scores = scores.t().reshape(n, heads, t, s)  # (S, N*h*T) -> (N, h, T, S), a small copy
            else:
                scores = torch.baddbmm(bias, image_pe, g.transpose(1, 2)).transpose(1, 2).reshape(n, heads, t, s)
        else:
            threads.all()
            q = _heads(a.module.q_proj(image_pe.float()), heads)  # (1 or N, h, S, d)
            scores = k @ q.transpose(-2, -1)
        weights = torch.softmax(scores, dim=2)  # over the tokens
        if reassociate:
            return torch.baddbmm(image, weights.to(dt).reshape(n, heads * t, s).transpose(1, 2), m)
        out = (weights.transpose(-2, -1).float() @ v).transpose(1, 2).reshape(n * s, -1)  # (N*S, h*d)
        residual = (image.float() + a.bo).expand(n, -1, -1).reshape(n * s, -1)
        return torch.addmm(residual, out, a.module.out_proj.weight.t()).view(n, s, -1).to(dt)

    def _upscale(self, image: Tensor, hyper: Tensor) -> Tensor:
        """Mask logits (N, M, 4E, 4E) float32 from image tokens (N, S, C) and hypernetwork outputs (N, 32, M).

        The two stride-2 transposed convolutions with 2x2 kernels and the LayerNorm between them act
        on each embedding cell alone, so they run as products on the cells; only the M masks are
        put back in image order.
        """
        n, s, c = image.shape
        c1 = self.up_norm[0].shape[0]
        up = _linear(image.reshape(n * s, c), *self.up1).view(n * s * 4, c1)  # rows (cell, a, b)
        up = F.gelu(F.layer_norm(up, (c1,), *self.up_norm))
        up = _linear(up, *self.up2, gelu=True).view(n, s * 16, -1)  # rows (cell, a, b, c, d)
        masks = (up @ hyper.to(up.dtype)).float()  # (N, S*16, M)
        e, m = self.size, hyper.shape[-1]
        masks = masks.view(n, e, e, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)  # (N, M, ty, a, c, tx, b, d)
        return masks.reshape(n, m, 4 * e, 4 * e)


# ------------------------------------------------------------------------------------- engine
class InferenceEngine:
    """Fast encode/decode for one `SamCore`, falling back to its plain methods where not applicable.

    ``encode`` uses `FastTinyViT` for a plain TinyViT on the CPU, ``prepare`` + ``decode`` use
    `FastDecoder` with transformers' decoder (every SAM of medfm). Companions are rebuilt when the
    network's parameters change; nothing is ever written into the network.
    """

    def __init__(self, core: nn.Module, precision: str = "fp32") -> None:
        self.core = core
        self.precision = check_precision(precision)
        self._encoder: tuple[tuple, FastTinyViT | None] | None = None
        self._decoder: tuple[tuple, FastDecoder | None] | None = None
        self._cache: tuple[tuple, ImageCache] | None = None

    def fast_encoder(self, device: torch.device) -> FastTinyViT | None:
        """The encoder companion, or None where the plain encoder must run."""
        encoder = self.core.image_encoder
        if device.type != "cpu" or not fast_tinyvit_supported(encoder):
            return None
        key = _fingerprint(encoder)
        if self._encoder is None or self._encoder[0] != key:
            self._encoder = (key, FastTinyViT(encoder, self.precision))
        return self._encoder[1]

    def fast_decoder(self) -> FastDecoder | None:
        """The decoder companion, or None where the plain decoder must run (training mode, other modules)."""
        core = self.core
        parts = (getattr(core, "mask_decoder", None), getattr(core, "prompt_encoder", None))
        if any(part is None or part.training for part in parts):
            return None
        key = _fingerprint(*parts, known=_decoder_types())
        if key is None:
            return None
        if self._decoder is None or self._decoder[0] != key:
            self._decoder = (key, FastDecoder(core, self.precision) if fast_decoder_supported(core) else None)
            self._cache = None
        return self._decoder[1]

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """As `SamCore.encode`: normalised (B, 3, S, S) -> float32 (B, C, E, E)."""
        fast = self.fast_encoder(pixels.device)
        if fast is None:
            return self.core.encode(pixels)
        size = self.core.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"expected pixel_values of shape (B, 3, {size}, {size}), got {tuple(pixels.shape)}")
        return fast(pixels)

    @torch.no_grad()
    def prepare(self, embedding: Tensor) -> ImageCache | None:
        """Build (or reuse) the decoder's per-image cache for a (1, C, E, E) embedding."""
        decoder = self.fast_decoder()
        if decoder is None or embedding.ndim != 4 or embedding.shape[0] != 1:
            return None
        key = (id(embedding), _version(embedding), embedding.data_ptr(), self._decoder[0])
        if self._cache is None or self._cache[0] != key or self._cache[1].embedding is not embedding:
            self._cache = (key, decoder.prepare(embedding))
        return self._cache[1]

    @torch.no_grad()
    def decode(self, embedding: Tensor, **prompts: Tensor | bool | None) -> tuple[Tensor, Tensor]:
        """As `SamCore.decode` (same arguments and results)."""
        cache = self.prepare(embedding)
        if cache is None:
            return self.core.decode(embedding, **prompts)
        return self._decoder[1].decode(cache, **prompts)
