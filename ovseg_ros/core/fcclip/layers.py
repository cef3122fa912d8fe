"""Small building blocks shared by the FC-CLIP pixel decoder and decoder.

The sine position encoding is DETR's (Carion et al., ECCV 2020, arXiv 2005.12872) in the normalised form
Mask2Former uses (Cheng et al., CVPR 2022, arXiv 2112.01527): positions are pixel centres' cumulative
counts divided by the map size, times 2*pi, under sin/cos at geometric frequencies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sine_position_embedding(
    height: int, width: int, num_feats: int, device: torch.device, temperature: float = 10000.0
) -> torch.Tensor:
    """(1, 2 * num_feats, height, width) normalised sine encoding, y channels first then x.

    Without padding masks every position counts, so row i has y = (i + 1) / (height + eps) * 2*pi.
    """
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device) / (height + eps) * scale
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device) / (width + eps) * scale
    k = torch.arange(num_feats, dtype=torch.float32, device=device)
    freq = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / num_feats)

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, num_feats), sin on even, cos on odd channels
        ang = pos[:, None] / freq
        return torch.stack((ang[:, 0::2].sin(), ang[:, 1::2].cos()), dim=2).flatten(1)

    ey = encode(y)[:, None, :].expand(height, width, num_feats)
    ex = encode(x)[None, :, :].expand(height, width, num_feats)
    return torch.cat((ey, ex), dim=2).permute(2, 0, 1).unsqueeze(0)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (not after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


class ConvNorm(nn.Module):
    """Conv2d (no bias) -> GroupNorm -> optional ReLU: the FPN convs of the pixel decoder."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, groups: int, relu: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(groups, out_ch)
        self.relu = relu
        nn.init.kaiming_uniform_(self.conv.weight, a=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.relu(x) if self.relu else x
