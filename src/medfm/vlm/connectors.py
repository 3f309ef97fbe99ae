"""Connectors: from an image encoder's tokens ``(B, N, C)`` to language-model embeddings
``(B, M, D)`` placed at the prompt's image placeholder. Built from a JSON spec (``kind``):

* ``linear``: one ``Linear`` (LLaVA v1);
* ``mlp``: LLaVA-1.5's ``mlp{depth}x_gelu`` (``Linear``, then ``GELU, Linear`` per extra layer;
  LLaVA-Med v1.5), its parameters numbered as LLaVA's ``nn.Sequential``;
* ``qformer``: BLIP-2's Q-Former (transformers' ``Blip2QFormerModel``, ``num_query_tokens``
  learned queries cross-attending to the image) and a linear projection into the LM (MiniGPT-4's
  and XrayGPT's ``llama_proj``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

KINDS = ("linear", "mlp", "qformer")


def mlp_connector(in_dim: int, out_dim: int, depth: int = 2) -> nn.Sequential:
    """LLaVA's ``mlp{depth}x_gelu`` projector."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class QFormerConnector(nn.Module):
    """BLIP-2's Q-Former with its learned queries, then a linear map into the LM's width."""

    def __init__(self, config: dict[str, Any], num_query_tokens: int, out_dim: int) -> None:
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        self.qformer = Blip2QFormerModel(Blip2QFormerConfig(**config))
        hidden = self.qformer.config.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, hidden))
        self.projection = nn.Linear(hidden, out_dim)

    def forward(self, features: Tensor) -> Tensor:
        queries = self.query_tokens.expand(len(features), -1, -1)
        output = self.qformer(query_embeds=queries, encoder_hidden_states=features)
        return self.projection(output.last_hidden_state)


def build_connector(spec: dict[str, Any], in_dim: int, out_dim: int) -> nn.Module:
    """A connector from its spec (see the module docstring)."""
    kind = spec["kind"]
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return mlp_connector(in_dim, out_dim, spec.get("depth", 2))
    if kind == "qformer":
        config = {**spec["config"], "encoder_hidden_size": in_dim}
        return QFormerConnector(config, spec["num_query_tokens"], out_dim)
    raise ValueError(f"unknown connector kind '{kind}' (one of {', '.join(KINDS)})")
