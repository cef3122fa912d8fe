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
(B, C, neighbours, H, W) stack: neighbours are slices of one padded copy, accumulated in place, and on the
CPU a few channels at a time (cache-sized). Memory is about three copies of the score map plus (neighbours,
H, W) affinities, which is what makes full-resolution refinement of 100+ query maps possible. Pure torch;
runs on CPU and GPU.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PAMR", "pamr", "pamr_chunks", "pamr_affinity", "neighbour_offsets"]


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


#: Score channels refined together on the CPU. PAMR is memory-bound there: a few channels at a time keep the
#: map and its padded copy in cache through all 16 neighbour passes, about 2x faster than all at once for
#: 50-170 query maps (same numbers). GPUs take all channels in one go (fewer, larger kernels).
CPU_CHANNEL_CHUNK = 4


def pamr(
    image: torch.Tensor,
    scores: torch.Tensor,
    steps: int = 10,
    dilations: Sequence[int] = (8, 16),
    channel_chunk: Optional[int] = None,
) -> torch.Tensor:
    """Refine ``scores`` (B, K, h, w) with the affinities of ``image`` (B, C, H, W); returns (B, K, H, W).

    Scores at another size are first resized to the image's with bilinear, ``align_corners=True`` (the
    reference's choice). Computation is float32; the result is float32. The update is the same for every
    channel, so channels are refined ``channel_chunk`` at a time (None: :data:`CPU_CHANNEL_CHUNK` on the CPU,
    all at once elsewhere); this changes speed and memory only.
    """
    if steps <= 0:
        return scores
    k = scores.shape[1] if scores.dim() == 4 else 0
    out: Optional[torch.Tensor] = None
    for start, part in pamr_chunks(image, scores, steps, dilations, channel_chunk):
        if start == 0 and part.shape[1] == k:
            return part
        if out is None:
            out = part.new_empty((part.shape[0], k, *part.shape[2:]))
        out[:, start:start + part.shape[1]] = part
    assert out is not None
    return out


def pamr_chunks(
    image: torch.Tensor,
    scores: torch.Tensor,
    steps: int = 10,
    dilations: Sequence[int] = (8, 16),
    channel_chunk: Optional[int] = None,
    upsample: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`pamr` as a stream of (first channel, refined (B, c, H, W) channels), affinities computed once.

    A caller that only reduces over channels (a softmax denominator, a max) can consume each chunk while it
    is still in cache and never hold all K refined maps. ``upsample`` replaces the resize of each chunk to the
    image's size (default: bilinear with ``align_corners=True``, as :func:`pamr`).
    """
    if scores.dim() != 4 or image.dim() != 4 or scores.shape[0] != image.shape[0]:
        raise ValueError(f"expected (B, K, h, w) scores and (B, C, H, W) image, got {tuple(scores.shape)}, "
                         f"{tuple(image.shape)}")
    dilations = [int(d) for d in dilations]
    h, w = image.shape[-2:]
    aff = pamr_affinity(image, dilations).unsqueeze(2) if steps > 0 else None  # (B, P, 1, H, W)
    offsets = neighbour_offsets(dilations)
    reach = max(dilations)
    k = scores.shape[1]
    chunk = channel_chunk or (CPU_CHANNEL_CHUNK if scores.device.type == "cpu" else k)
    for start in range(0, k, chunk):
        m = scores[:, start:start + chunk].float()
        if tuple(m.shape[-2:]) != (h, w):
            m = upsample(m) if upsample is not None else F.interpolate(m, size=(h, w), mode="bilinear",
                                                                       align_corners=True)
        for _ in range(steps):
            # One replicate-padded copy at the largest dilation serves every dilation: clamping to the border
            # is the same whatever the padding width.
            padded = F.pad(m, [reach] * 4, mode="replicate")
            _, dy, dx = offsets[0]
            out = aff[:, 0] * _shifted(padded, reach, dy, dx, h, w)
            for p, (_, dy, dx) in enumerate(offsets[1:], start=1):
                out.addcmul_(aff[:, p], _shifted(padded, reach, dy, dx, h, w))
            m = out
        yield start, m


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
