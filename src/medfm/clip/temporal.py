"""BioViL-T's fusion of a prior image with the current one (Bannur et al., CVPR 2023).

BioViL-T encodes the current and the prior chest X-ray with one shared CNN into patch grids, then a
small transformer reads both grids at once (shared spatial position embeddings, one type embedding
per image) and returns, at each position of the current image, a "temporal" feature of what
changed. The image's patch features are the static features concatenated with the temporal ones;
when there is no prior image, a learned "missing prior" embedding stands in for the temporal part,
so one model serves studies with and without a prior.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TemporalFusionHead(nn.Module):
    """(B, C, H, W) current grid [+ prior grid] -> (B, C + dim) pooled static + temporal features."""

    takes_prior = True

    def __init__(self, channels: int, grid: int, dim: int = 128, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.project = nn.Conv2d(channels, dim, 1)
        self.position = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.image_type = nn.Parameter(torch.zeros(2, dim))  # 0: current, 1: prior
        self.missing_prior = nn.Parameter(torch.zeros(1, dim, 1, 1))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.position, std=0.02)
        nn.init.trunc_normal_(self.image_type, std=0.02)
        self.out_dim = channels + dim

    def patch_features(self, current: Tensor, prior: Tensor | None = None) -> Tensor:
        """(B, C + dim, H, W): static features and, per position, the temporal features."""
        batch, _, height, width = current.shape
        if prior is None:
            temporal = self.missing_prior.expand(batch, -1, height, width)
        else:
            tokens = [self.project(x).flatten(2).transpose(1, 2) + self.position + self.image_type[i] for i, x in enumerate((current, prior))]
            fused = self.norm(self.transformer(torch.cat(tokens, dim=1)))[:, : height * width]
            temporal = fused.transpose(1, 2).reshape(batch, -1, height, width)
        return torch.cat([current, temporal], dim=1)

    def forward(self, current: Tensor, prior: Tensor | None = None) -> Tensor:
        return self.patch_features(current, prior).mean(dim=(2, 3))
