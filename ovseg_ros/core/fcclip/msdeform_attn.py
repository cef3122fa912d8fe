"""Multi-scale deformable attention (MSDeformAttn) in plain PyTorch.

Zhu et al., "Deformable DETR: Deformable Transformers for End-to-End Object Detection", ICLR 2021
(arXiv 2010.04159), https://github.com/fundamentalvision/Deformable-DETR, as used by Mask2Former's pixel
decoder (https://github.com/facebookresearch/Mask2Former, ``pixel_decoder/ops``) and FC-CLIP.

Each query attends to ``n_points`` locations per head and per feature level, placed around a reference point
by learned offsets and mixed by softmax weights. The sampling is bilinear with zero padding outside the map,
in the ``align_corners=False`` convention (location 0 and 1 are the outer edges of the first and last
pixel), which is exactly what ``F.grid_sample`` computes.

Three interchangeable implementations of the same sum (equal up to float rounding, tested against explicit
loops): :func:`ms_deform_attn_sample` (``F.grid_sample`` per level, the authors' fallback: any device, no
build step, ONNX-exportable from opset 16); :func:`ms_deform_attn_gather` (the four corner rows of every
sample gathered and weighted by ``F.embedding_bag``: about 3x faster on a CPU, where grid_sample strides
through channels-first memory); and the authors' compiled CUDA op ``MultiScaleDeformableAttention`` when it
is importable. ``kernel="auto"`` picks the compiled op on CUDA if present, else grid_sample on CUDA and the
gather on CPU.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models import upload

log = logging.getLogger(__name__)

_KERNEL: object = None  # the compiled module, False once known to be unavailable


def _compiled_kernel() -> Optional[object]:
    """The ``MultiScaleDeformableAttention`` extension built from Deformable-DETR/Mask2Former, if installed."""
    global _KERNEL
    if _KERNEL is None:
        try:
            import MultiScaleDeformableAttention as kernel  # type: ignore[import-not-found]

            _KERNEL = kernel
        except Exception:  # ImportError, or a build for another torch/CUDA: fall back silently
            _KERNEL = False
    return _KERNEL or None


def ms_deform_attn_sample(
    value: torch.Tensor,
    shapes: Sequence[tuple[int, int]],
    locations: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """The deformable-attention sum, by ``F.grid_sample`` per level.

    Args:
        value: (N, S, M, Dh) per-head values of all levels flattened row-major, S = sum(h * w).
        shapes: (h, w) of each level, in the order the levels are concatenated in ``value``.
        locations: (N, Lq, M, L, P, 2) sampling points as (x, y) in [0, 1] of each level's extent.
        weights: (N, Lq, M, L, P) attention weights (softmax over L * P already applied).

    Returns:
        (N, Lq, M * Dh): for each query and head, sum over levels and points of weight * bilinear sample.
    """
    n, _, m, dh = value.shape
    _, lq, _, _, p, _ = locations.shape
    grids = 2.0 * locations - 1.0  # grid_sample wants [-1, 1]
    out = value.new_zeros((n * m, dh, lq))
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        # (N, h*w, M, Dh) -> (N*M, Dh, h, w): one "image" per batch element and head.
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(n * m, dh, h, w)
        start += h * w
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(n * m, lq, p, 2)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (N*M, Dh, Lq, P)
        wl = weights[:, :, :, lvl].transpose(1, 2).reshape(n * m, 1, lq, p)
        # Summing level by level keeps the peak at one level's samples instead of all levels stacked.
        out += (sampled * wl).sum(-1)
    return out.view(n, m * dh, lq).transpose(1, 2)


def ms_deform_attn_gather(
    value: torch.Tensor,
    shapes: Sequence[tuple[int, int]],
    locations: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Same contract and result as :func:`ms_deform_attn_sample`, by gathering rows.

    Every sampling point contributes its 4 neighbouring pixels with weight attention x bilinear (0 outside
    the map), so each (query, head) output is a weighted sum of ``levels * points * 4`` rows of the value
    table: exactly what ``F.embedding_bag(..., per_sample_weights, mode="sum")`` computes without
    materialising the samples.
    """
    n, s, m, dh = value.shape
    lq = locations.shape[1]
    dev, dt = value.device, weights.dtype
    sizes = upload(shapes, dev, torch.long)  # (L, 2) as (h, w)
    hs, ws = sizes[:, 0, None], sizes[:, 1, None]  # (L, 1): broadcast over the points axis
    starts = (torch.cumsum(sizes[:, 0] * sizes[:, 1], 0) - sizes[:, 0] * sizes[:, 1])[:, None]
    px = locations[..., 0] * ws.to(locations.dtype) - 0.5  # pixel coordinates, centres at integers
    py = locations[..., 1] * hs.to(locations.dtype) - 0.5
    fx0, fy0 = px.floor(), py.floor()
    fx, fy = (px - fx0).to(dt), (py - fy0).to(dt)
    x0, y0 = fx0.long(), fy0.long()
    # Per-axis weights of the two neighbours, zeroed outside the map (zero padding).
    wx = ((1 - fx) * ((x0 >= 0) & (x0 < ws)), fx * ((x0 >= -1) & (x0 < ws - 1)))
    wy = ((1 - fy) * ((y0 >= 0) & (y0 < hs)), fy * ((y0 >= -1) & (y0 < hs - 1)))
    base = starts + y0 * ws + x0  # flat index of the top-left neighbour within this image and head
    idx = torch.stack([base, base + 1, base + ws, base + ws + 1], -1)
    # Outside corners have weight 0; any in-range row will do for them.
    idx = idx.clamp_(0, s - 1)
    wgt = torch.stack([wy[0] * wx[0], wy[0] * wx[1], wy[1] * wx[0], wy[1] * wx[1]], -1) * weights[..., None]
    # (N, Lq, M, L, P, 4) -> (N, M, Lq, L*P*4); rows of head h of image b start at (b*M + h) * S.
    idx_t = idx.permute(0, 2, 1, 3, 4, 5).reshape(n, m, lq, -1) + (torch.arange(n * m, device=dev) * s).view(n, m, 1, 1)
    wgt_t = wgt.permute(0, 2, 1, 3, 4, 5).reshape(n * m * lq, -1)
    table = value.permute(0, 2, 1, 3).reshape(n * m * s, dh)
    out = F.embedding_bag(idx_t.reshape(n * m * lq, -1), table, per_sample_weights=wgt_t.to(table.dtype), mode="sum")
    return out.view(n, m, lq, dh).permute(0, 2, 1, 3).reshape(n, lq, m * dh)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable self-/cross-attention (the layer of Deformable DETR's encoder).

    Args:
        d_model: channels of queries and values.
        n_levels: feature levels sampled.
        n_heads: attention heads (d_model must be a multiple).
        n_points: sampling points per head and level.
        kernel: ``auto`` (compiled op on CUDA if importable, else grid_sample on CUDA, gather on CPU),
            ``grid_sample`` or ``gather``.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4,
                 kernel: str = "auto") -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.kernel = kernel
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Deformable DETR's initialisation: head h starts sampling along direction 2*pi*h/H, point k at
        # distance k+1 pixels, uniform weights. Only matters for random-weight (test) models.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        dirs = torch.stack([angles.cos(), angles.sin()], -1)
        dirs = dirs / dirs.abs().max(-1, keepdim=True).values
        grid = dirs[:, None, None, :] * torch.arange(1, self.n_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.expand(-1, self.n_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_input: torch.Tensor,
        shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """query (N, Lq, C); reference_points (N, Lq, L, 2) in [0, 1]; value_input (N, S, C) -> (N, Lq, C)."""
        n, lq, _ = query.shape
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_input).view(n, value_input.shape[1], m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(n, lq, m, lv, p, 2)
        weights = self.attention_weights(query).view(n, lq, m, lv * p).softmax(-1).view(n, lq, m, lv, p)
        # Offsets are in pixels of each level: divide by (w, h) to get fractions of the level's extent.
        norm = upload([(w, h) for h, w in shapes], query.device, query.dtype)
        locations = reference_points[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None, :]
        return self.output_proj(self._sample(value, shapes, locations, weights))

    def _sample(self, value: torch.Tensor, shapes: Sequence[tuple[int, int]], locations: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        if self.kernel == "auto" and value.is_cuda and value.dtype == torch.float32:
            kernel = _compiled_kernel()
            if kernel is not None:
                try:
                    spatial = torch.tensor(shapes, dtype=torch.long, device=value.device)
                    starts = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
                    return kernel.ms_deform_attn_forward(  # type: ignore[attr-defined]
                        value.contiguous(), spatial, starts, locations.contiguous(), weights.contiguous(), 64
                    )
                except RuntimeError as exc:  # e.g. built for another arch: use PyTorch from now on
                    log.warning("compiled MSDeformAttn failed (%s); using grid_sample", exc)
                    self.kernel = "grid_sample"
        if self.kernel == "gather" or (self.kernel == "auto" and not value.is_cuda):
            return ms_deform_attn_gather(value, shapes, locations, weights)
        return ms_deform_attn_sample(value, shapes, locations, weights)
