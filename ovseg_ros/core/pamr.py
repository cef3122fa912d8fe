"""PAMR: pixel-adaptive mask refinement, a training-free edge-aware smoothing of class score maps.

From Araslanov & Roth, "Single-Stage Semantic Segmentation from Image Labels", CVPR 2020
(github.com/visinf/1-stage-wseg, ``models/mods/pamr.py``); ITACLIP, SCLIP and NACLIP run it on their
upsampled logits with 10 iterations and dilations (8, 16).

For each pixel i and its neighbours j (the 8 outer cells of a 3x3 grid at every dilation d, image
borders replicated):

* affinity ``a_ij = softmax_j( -mean_c |I_c(i) - I_c(j)| / (1e-8 + 0.1 * sigma_c(i)) )`` where
  ``sigma_c(i)`` is the unbiased standard deviation of channel c over the 3x3 grids of *all* dilations
  around i (centre included, so 9 samples per dilation), as in the reference implementation;
* each iteration replaces the scores by the affinity-weighted mean of the neighbours' scores:
  ``m(i) <- sum_j a_ij m(j)``.

The update is linear in ``m`` and the affinities of a pixel sum to 1, so constant maps stay constant.

This implementation gives the same numbers as the reference but never materialises the
(B, C, neighbours, H, W) stack: neighbours are slices of one padded copy per dilation, accumulated in
place. Memory is about three copies of the score map plus (neighbours, H, W) affinities, which is what
makes full-resolution refinement of 100+ query maps possible. Pure torch; runs on CPU and GPU.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PAMR", "pamr", "pamr_affinity", "neighbour_offsets"]


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int, int]]:
    """(dilation, dy, dx) of every neighbour: 8 per dilation, centre excluded, row-major order."""
    out = []
    for d in dilations:
        if int(d) < 1:
            raise ValueError(f"PAMR dilations must be >= 1, got {d}")
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    out.append((int(d), dy * int(d), dx * int(d)))
    return out


def _shifted(padded: torch.Tensor, d: int, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
    """The map whose pixel (y, x) is the original's (y + dy, x + dx), from a copy padded by ``d``."""
    return padded[..., d + dy : d + dy + h, d + dx : d + dx + w]


def _padded(x: torch.Tensor, dilations: Sequence[int]) -> Iterator[tuple[int, torch.Tensor]]:
    for d in dict.fromkeys(int(v) for v in dilations):  # unique, order kept
        yield d, F.pad(x, [d] * 4, mode="replicate")


def _local_std(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """Per-channel unbiased std over the 3x3 grids (centre included) of all dilations: (B, C, H, W)."""
    h, w = image.shape[-2:]
    grid = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    n = 9 * len(dilations)
    total = torch.zeros_like(image)
    for d in dilations:
        padded = F.pad(image, [d] * 4, mode="replicate")
        for dy, dx in grid:
            total += _shifted(padded, d, dy * d, dx * d, h, w)
    mean = total / n
    sq = torch.zeros_like(image)
    for d in dilations:  # two passes: exact zeros on flat regions, unlike E[x^2] - E[x]^2
        padded = F.pad(image, [d] * 4, mode="replicate")
        for dy, dx in grid:
            sq += (_shifted(padded, d, dy * d, dx * d, h, w) - mean).square()
    return (sq / (n - 1)).sqrt()


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = (8, 16)) -> torch.Tensor:
    """Neighbour weights (B, P, H, W), P = 8 * len(dilations), summing to 1 over P (float32).

    Args:
        image: (B, C, H, W) guidance image (any affine scaling per channel gives the same weights,
            since differences are divided by the local standard deviation).
    """
    if image.dim() != 4:
        raise ValueError(f"image must be (B, C, H, W), got {tuple(image.shape)}")
    image = image.float()
    dilations = [int(d) for d in dilations]
    h, w = image.shape[-2:]
    scale = 1e-8 + 0.1 * _local_std(image, dilations)
    logits = []
    pads = dict(_padded(image, dilations))
    for d, dy, dx in neighbour_offsets(dilations):
        diff = (image - _shifted(pads[d], d, dy, dx, h, w)).abs() / scale
        logits.append(-diff.mean(dim=1))
    return torch.softmax(torch.stack(logits, dim=1), dim=1)


def pamr(
    image: torch.Tensor,
    scores: torch.Tensor,
    steps: int = 10,
    dilations: Sequence[int] = (8, 16),
) -> torch.Tensor:
    """Refine ``scores`` (B, K, h, w) with the affinities of ``image`` (B, C, H, W); returns (B, K, H, W).

    Scores at another size are first resized to the image's with bilinear, ``align_corners=True`` (the
    reference's choice). Computation is float32; the result is float32.
    """
    if steps <= 0:
        return scores
    if scores.dim() != 4 or image.dim() != 4 or scores.shape[0] != image.shape[0]:
        raise ValueError(f"expected (B, K, h, w) scores and (B, C, H, W) image, got {tuple(scores.shape)}, "
                         f"{tuple(image.shape)}")
    dilations = [int(d) for d in dilations]
    h, w = image.shape[-2:]
    m = scores.float()
    if tuple(m.shape[-2:]) != (h, w):
        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=True)
    aff = pamr_affinity(image, dilations).unsqueeze(2)  # (B, P, 1, H, W): broadcast over K
    offsets = neighbour_offsets(dilations)
    for _ in range(steps):
        out = torch.zeros_like(m)
        pads = dict(_padded(m, dilations))
        for p, (d, dy, dx) in enumerate(offsets):
            out.addcmul_(aff[:, p], _shifted(pads[d], d, dy, dx, h, w))
        m = out
    return m


class PAMR(nn.Module):
    """Module form of :func:`pamr` (``forward(image, scores)``), for code that composes modules."""

    def __init__(self, steps: int = 10, dilations: Sequence[int] = (8, 16)) -> None:
        super().__init__()
        self.steps = int(steps)
        self.dilations = tuple(int(d) for d in dilations)
        neighbour_offsets(self.dilations)  # validate early

    def forward(self, image: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return pamr(image, scores, self.steps, self.dilations)

    def extra_repr(self) -> str:
        return f"steps={self.steps}, dilations={self.dilations}"
