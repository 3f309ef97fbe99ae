"""Flamingo's way of seeing (OpenFlamingo, Med-Flamingo): the image never enters the token
sequence. A perceiver resampler turns the encoder's tokens into a few latents, and gated
cross-attention blocks before every N-th LM layer let the text after an ``<image>`` token attend
to them (``tanh`` gates, zero at initialisation, so the LM starts as it was). Parameter names
follow OpenFlamingo's ``helpers.py`` so its checkpoints load as they are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfm.vlm.model import VisionLanguageModel


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm, Linear, GELU, Linear (no biases), as OpenFlamingo's ``FeedForward``."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


def _attend(query: Tensor, key: Tensor, value: Tensor, heads: int) -> Tensor:
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(query), split(key), split(value))
    return out.transpose(1, 2).flatten(2)


class PerceiverAttention(nn.Module):
    """Latents attend to the media and to themselves."""

    def __init__(self, dim: int, heads: int, dim_head: int = 64) -> None:
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        media, latents = self.norm_media(media), self.norm_latents(latents)
        key, value = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(_attend(self.to_q(latents), key, value, self.heads))


class PerceiverResampler(nn.Module):
    """``num_latents`` learned latents refined over ``depth`` layers: (B, N, D) -> (B, num_latents, D)."""

    def __init__(self, dim: int, depth: int, heads: int, num_latents: int, dim_head: int = 64) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(num_latents, dim))
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim, heads, dim_head), feed_forward(dim)])
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: Tensor) -> Tensor:
        latents = self.latents.expand(len(media), -1, -1)
        for attention, ff in self.layers:
            latents = attention(media, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


class GatedCrossAttentionBlock(nn.Module):
    """Text attends to the latents of the image before it; both updates pass a ``tanh`` gate."""

    def __init__(self, dim: int, dim_visual: int, heads: int, dim_head: int = 64) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.norm = nn.LayerNorm(dim)
        self.attn.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.attn.to_kv = nn.Linear(dim_visual, 2 * heads * dim_head, bias=False)
        self.attn.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(dim)
        self.ff_gate = nn.Parameter(torch.zeros(1))
        self.heads = heads

    def forward(self, text: Tensor, media: Tensor, sees_image: Tensor) -> Tensor:
        """``sees_image`` (L,): whether each text position comes after the ``<image>`` token (those
        before it get no update, as OpenFlamingo zeroes their attention)."""
        key, value = self.attn.to_kv(media).chunk(2, dim=-1)
        attended = _attend(self.attn.to_q(self.attn.norm(text)), key, value, self.heads)
        attended = attended * sees_image.to(text.dtype)[None, :, None]
        text = self.attn.to_out(attended) * self.attn_gate.tanh() + text
        return self.ff(text) * self.ff_gate.tanh() + text


class FlamingoLayer(nn.Module):
    """A decoder layer with a gated cross-attention block before it, conditioned on the image."""

    def __init__(self, gated: GatedCrossAttentionBlock, decoder_layer: nn.Module) -> None:
        super().__init__()
        self.gated_cross_attn_layer = gated
        self.decoder_layer = decoder_layer
        self.media: Tensor | None = None
        self.sees_image = torch.zeros(0, dtype=torch.bool)
        if hasattr(decoder_layer, "attention_type"):
            self.attention_type = decoder_layer.attention_type

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.media is not None:
            hidden_states = self.gated_cross_attn_layer(hidden_states, self.media, self._sees_image(hidden_states.shape[1]))
        return self.decoder_layer(hidden_states, *args, **kwargs)

    def _sees_image(self, length: int) -> Tensor:
        """The prompt's mask; a longer sequence (prompt + a scored answer) and a cached generation
        step continue as the prompt ended."""
        known = self.sees_image
        last = bool(known[-1]) if len(known) else False
        if length == len(known):
            return known
        if length > len(known):
            return torch.cat([known, torch.full((length - len(known),), last)])
        return torch.full((length,), last)


class FlamingoModel(VisionLanguageModel):
    """Encoder -> perceiver resampler; the LM's layers wrapped by `FlamingoLayer` every
    ``cross_attn_every_n_layers``. The prompt keeps its ``<image>`` token."""

    def flamingo_layers(self) -> list[FlamingoLayer]:
        return [m for m in self.language_model.modules() if isinstance(m, FlamingoLayer)]

    def embed(self, prompt: str, image_tokens: Tensor | None) -> Tensor:
        placeholder = self.prompt_format.placeholder
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids[0]
        image_id = self.tokenizer.convert_tokens_to_ids(placeholder)
        if image_tokens is not None and int((ids == image_id).sum()) != 1:
            from medfm.errors import PromptError

            raise PromptError(f"the prompt must hold the image token {placeholder!r} exactly once")
        sees_image = (ids == image_id).cumsum(0) > 0 if image_tokens is not None else torch.zeros(len(ids), dtype=torch.bool)
        for layer in self.flamingo_layers():
            layer.media = image_tokens
            layer.sees_image = sees_image.to(self.device)
        self._check_context(len(ids))
        return self.language_model.get_input_embeddings()(ids.to(self.device)).unsqueeze(0)


def add_flamingo_layers(language_model: nn.Module, dim_visual: int, every: int, heads: int) -> None:
    """Wrap every ``every``-th decoder layer (the ``every``-th, 2``every``-th, ...) of a transformers
    causal LM with a `FlamingoLayer`."""
    layers = language_model.model.layers
    for index in gated_indices(len(layers), every):
        layers[index] = FlamingoLayer(GatedCrossAttentionBlock(language_model.config.hidden_size, dim_visual, heads),
                                      layers[index])


def gated_indices(layers: int, every: int) -> list[int]:
    """The decoder layers OpenFlamingo puts a gated cross-attention block before."""
    return [index for index in range(layers) if (index + 1) % every == 0]
