"""The multi-scale deformable-attention pixel decoder of Mask2Former, as FC-CLIP uses it.

Cheng et al., "Masked-attention Mask Transformer for Universal Image Segmentation", CVPR 2022
(arXiv 2112.01527), https://github.com/facebookresearch/Mask2Former (``MSDeformAttnPixelDecoder``).

The three coarsest backbone maps (strides 32, 16, 8) are projected to ``hidden_dim`` (1x1 conv + GroupNorm),
flattened together and refined by a stack of post-norm deformable-attention encoder layers whose queries are
every position of every level (positions: sine encoding + a learned per-level embedding). Finer backbone
maps (stride 4 in FC-CLIP) join FPN-style: a lateral 1x1 conv plus the bilinearly upsampled coarser output,
then a 3x3 conv. ``mask_features`` is a 1x1 conv of the finest output. Everything runs in float32.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvNorm, sine_position_embedding
from .msdeform_attn import MSDeformAttn


class DeformEncoderLayer(nn.Module):
    """Post-norm: x = LN(x + MSDeformAttn(x + pos)); x = LN(x + FFN(x)) with a ReLU FFN."""

    def __init__(self, dim: int, ffn_dim: int, levels: int, heads: int, points: int, kernel: str) -> None:
        super().__init__()
        self.attn = MSDeformAttn(dim, levels, heads, points, kernel)
        self.attn_norm = nn.LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.ffn_out = nn.Linear(ffn_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, ref: torch.Tensor,
                shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x + pos, ref, x, shapes))
        return self.ffn_norm(x + self.ffn_out(F.relu(self.ffn_in(x))))


def encoder_reference_points(shapes: Sequence[tuple[int, int]], levels: int, device: torch.device) -> torch.Tensor:
    """(1, S, levels, 2): every pixel centre of every level as (x, y) in [0, 1], the same for all levels.

    Without padding the valid ratios are 1, so a query's reference point is its own normalised position,
    looked up at the same relative place on each level.
    """
    refs = []
    for h, w in shapes:
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        refs.append(torch.stack((gx.reshape(-1), gy.reshape(-1)), -1))
    ref = torch.cat(refs, 0)
    return ref[None, :, None, :].expand(1, ref.shape[0], levels, 2)


class MSDeformPixelDecoder(nn.Module):
    """Backbone maps (fine to coarse) -> (mask_features at the finest stride, [coarse..fine] 3 levels).

    Args:
        in_channels: channels of the backbone maps, finest first (res2, res3, res4, res5).
        dim: hidden channels; mask_dim: channels of ``mask_features``.
        enc_layers, enc_heads, enc_points, enc_ffn_dim: deformable encoder sizes.
        gn_groups: GroupNorm groups; kernel: MSDeformAttn kernel choice.
        transformer_levels: how many of the coarsest maps enter the encoder (3 in Mask2Former/FC-CLIP).
    """

    def __init__(self, in_channels: Sequence[int], dim: int = 256, mask_dim: int = 256, enc_layers: int = 6,
                 enc_heads: int = 8, enc_points: int = 4, enc_ffn_dim: int = 1024, gn_groups: int = 32,
                 kernel: str = "auto", transformer_levels: int = 3) -> None:
        super().__init__()
        self.levels = transformer_levels
        coarse_channels = list(in_channels)[-transformer_levels:][::-1]  # res5, res4, res3
        self.fpn_channels = list(in_channels)[:-transformer_levels]  # res2
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), nn.GroupNorm(gn_groups, dim)) for c in coarse_channels
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        self.level_embed = nn.Parameter(torch.randn(transformer_levels, dim))
        self.encoder = nn.ModuleList(
            DeformEncoderLayer(dim, enc_ffn_dim, transformer_levels, enc_heads, enc_points, kernel)
            for _ in range(enc_layers)
        )
        # lateral[i] / output[i] serve backbone map i (finest first), applied coarse to fine.
        self.lateral = nn.ModuleList(ConvNorm(c, dim, 1, gn_groups, relu=False) for c in self.fpn_channels)
        self.output = nn.ModuleList(ConvNorm(dim, dim, 3, gn_groups, relu=True) for _ in self.fpn_channels)
        self.mask_proj = nn.Conv2d(dim, mask_dim, kernel_size=1)
        nn.init.kaiming_uniform_(self.mask_proj.weight, a=1)
        nn.init.zeros_(self.mask_proj.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``features``: backbone maps finest first. Returns (mask_features, [stride 32, 16, 8] maps)."""
        feats = [f.float() for f in features]  # deformable attention is run in fp32, as by the authors
        coarse = feats[-self.levels:][::-1]
        srcs, pos, shapes = [], [], []
        for lvl, (x, proj) in enumerate(zip(coarse, self.input_proj)):
            h, w = x.shape[-2:]
            shapes.append((int(h), int(w)))
            srcs.append(proj(x).flatten(2).transpose(1, 2))  # (N, h*w, C)
            pe = sine_position_embedding(h, w, self.level_embed.shape[1] // 2, x.device)
            pos.append(pe.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src = torch.cat(srcs, 1)
        pos_all = torch.cat(pos, 1)
        ref = encoder_reference_points(shapes, self.levels, src.device).expand(src.shape[0], -1, -1, -1)
        for layer in self.encoder:
            src = layer(src, pos_all, ref, shapes)
        n = src.shape[0]
        outs = [z.transpose(1, 2).reshape(n, -1, h, w) for z, (h, w) in zip(src.split([h * w for h, w in shapes], 1), shapes)]
        for idx in reversed(range(len(self.fpn_channels))):  # coarse to fine
            lat = self.lateral[idx](feats[idx])
            up = F.interpolate(outs[-1], size=lat.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(self.output[idx](lat + up))
        return self.mask_proj(outs[-1]), outs[:3]
