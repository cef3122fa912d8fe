"""Image geometry shared by the segmenters: tensors, normalisation, resizing and sliding windows.

Sliding windows follow the mmsegmentation ``slide`` convention the authors' code uses: a regular grid
of ``crop`` windows every ``stride`` pixels, the last window of each row/column snapped to the image edge,
logits summed per pixel and divided by the number of windows covering it.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F


def image_to_device(image: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """The camera frame as it is (uint8) on ``device``: the frame's one host->device copy, ``non_blocking``
    (from pageable memory CUDA stages it without waiting for the device)."""
    return torch.from_numpy(np.ascontiguousarray(image)).to(device, non_blocking=True)


def image_to_tensor(image: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) in [0, 1] on ``device`` (one host->device copy)."""
    t = image_to_device(image, device)
    return t.permute(2, 0, 1).unsqueeze(0).to(dtype).div_(255.0)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean.to(x.dtype)) / std.to(x.dtype)


def short_side_size(h: int, w: int, short: int, max_long: int = 0) -> tuple[int, int]:
    """Output (h, w) with the short side at ``short`` (aspect kept), long side capped at ``max_long`` if > 0."""
    scale = short / min(h, w)
    if max_long > 0 and max(h, w) * scale > max_long:
        scale = max_long / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(x, size=size, mode=mode, **kwargs)


def sliding_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) windows covering an h x w image (mmseg grid; windows smaller than crop if the image is)."""
    if crop <= 0 or stride <= 0:
        raise ValueError(f"crop and stride must be positive, got {crop}, {stride}")
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(h_grids):
        for j in range(w_grids):
            y1 = min(i * stride + crop, h)
            x1 = min(j * stride + crop, w)
            out.append((max(y1 - crop, 0), y1, max(x1 - crop, 0), x1))
    return out


def slide_inference(
    image: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    crop: int,
    stride: int,
    num_channels: int,
    batch_size: int = 16,
) -> torch.Tensor:
    """Run ``fn`` over sliding windows of ``image`` (1, 3, H, W) and average the (B, C, h, w) outputs.

    ``fn`` maps a batch of equal-size crops to logits at crop resolution. Windows are batched
    ``batch_size`` at a time (all windows have the same size unless the image is smaller than ``crop``).
    Returns (1, C, H, W).
    """
    _, _, h, w = image.shape
    wins = sliding_windows(h, w, crop, stride)
    out = image.new_zeros((1, num_channels, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for s in range(0, len(wins), batch_size):
        group = wins[s:s + batch_size]
        crops = torch.cat([image[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in group])
        logits = fn(crops).float()
        for k, (y0, y1, x0, x1) in enumerate(group):
            out[:, :, y0:y1, x0:x1] += logits[k:k + 1]
            count[:, :, y0:y1, x0:x1] += 1
    return out / count


def pad_to_multiple(x: torch.Tensor, multiple: int, value: float = 0.0) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad (right/bottom) so H and W are multiples of ``multiple``; returns the padded tensor and (pad_h, pad_w)."""
    h, w = x.shape[-2:]
    ph = (multiple - h % multiple) % multiple
    pw = (multiple - w % multiple) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=value)
    return x, (ph, pw)


def round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def num_windows(h: int, w: int, crop: int, stride: Optional[int]) -> int:
    return len(sliding_windows(h, w, crop, stride or crop))


def upsample_max(
    scores: torch.Tensor, size: tuple[int, int], chunk: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinearly upsample (K, h, w) scores to ``size`` and return per-pixel (max, argmax) over K.

    Processes ``chunk`` classes at a time so a large vocabulary never materialises K x H x W at full
    resolution (150 classes at 720p would be ~0.5 GB in float32).
    """
    best = idx = None
    for s in range(0, scores.shape[0], chunk):
        up = resize(scores[None, s:s + chunk].float(), size)[0]
        m, i = up.max(dim=0)
        if best is None:
            best, idx = m, i
        else:
            better = m > best
            best = torch.where(better, m, best)
            idx = torch.where(better, i + s, idx)
    assert best is not None and idx is not None
    return best, idx


def _bilinear_taps(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (i0, i1) and the weight of i1 for each output index, as ``F.interpolate`` computes them
    (bilinear, ``align_corners=False``, size given: scale = in / out, negative positions clamped to 0)."""
    scale = n_in / n_out
    src = ((torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    i0 = src.floor().long().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    return i0, i1, src - i0


def bilinear_at(scores: torch.Tensor, size: tuple[int, int], ys: torch.Tensor, xs: torch.Tensor,
                classes: Optional[torch.Tensor] = None,
                transform: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                ) -> torch.Tensor:
    """Exact bilinearly upsampled values of (K, h, w) ``scores`` at full-resolution pixels (ys, xs).

    Returns (K, N) for all classes, or (N,) for one class per pixel when ``classes`` (N,) is given.
    ``transform(values, rows, cols)``, if given, maps the gathered low-resolution values (and their pixel
    coordinates) to the scores that are upsampled, e.g. logits to probabilities only where needed.
    """
    h, w = scores.shape[-2:]
    y0, y1, wy = _bilinear_taps(h, size[0], scores.device)
    x0, x1, wx = _bilinear_taps(w, size[1], scores.device)
    a0, a1, fy = y0[ys], y1[ys], wy[ys]
    b0, b1, fx = x0[xs], x1[xs], wx[xs]
    s = scores.float()
    flat = s.reshape(s.shape[0], -1) if classes is None else s.flatten()

    def get(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # Flat indices: index_select/take are several times faster than two-tensor advanced indexing on CPU.
        v = flat.index_select(1, a * w + b) if classes is None else flat.take(classes * (h * w) + a * w + b)
        return v if transform is None else transform(v, a, b)
    top = get(a0, b0) * (1 - fx) + get(a0, b1) * fx
    bottom = get(a1, b0) * (1 - fx) + get(a1, b1) * fx
    return top * (1 - fy) + bottom * fy


def upsample_max_topk(
    scores: torch.Tensor, size: tuple[int, int], k: int = 2, exact_below: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`upsample_max` with a cost that does not grow with the number of classes K.

    Each output pixel is a bilinear mix of the four low-resolution pixels at the corners of its cell, so its
    winner is almost always among the union of the corners' top-``k`` classes: only those ``4k`` candidates
    are upsampled. A class outside every corner's top ``k`` scores at most the same mix of the corners'
    (k+1)-th best scores, so where the best candidate beats that bound the label is the full path's; the
    rare pixels where it does not are recomputed over all K classes. Labels therefore equal
    :func:`upsample_max`'s up to floating-point ties. Vocabularies below ``exact_below`` classes (or fewer
    than ``4k + 1``), and outputs with fewer than 4x the input's pixels, take :func:`upsample_max` directly.
    """
    n_cls, h, w = scores.shape
    if n_cls < max(exact_below, 4 * k + 1) or size[0] * size[1] < 4 * h * w:
        # Small vocabulary, or hardly any upsampling: a top-k over every source pixel costs more than it saves.
        return upsample_max(scores, size)
    s = scores.float()
    vals, idx = s.topk(k + 1, dim=0)
    flat = s.flatten()
    return upsample_max_candidates(
        vals, idx[:k], size,
        lambda cls, pix: flat.take(cls * (h * w) + pix),
        lambda ys, xs: bilinear_at(s, size, ys, xs),
        lambda: upsample_max(scores, size),
    )


def upsample_max_candidates(
    top_values: torch.Tensor,
    top_classes: torch.Tensor,
    size: tuple[int, int],
    score_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    exact_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    full: Callable[[], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate-and-bound core of :func:`upsample_max_topk`, for scores that are never materialised.

    Args:
        top_values: (k+1, h, w) each low-resolution pixel's k+1 best scores, best first (the last is the bound).
        top_classes: (k, h, w) the classes of the first k.
        score_at: ``score_at(classes, pixels)`` -> the low-resolution scores of those classes at those flat
            pixel indices (same shapes).
        exact_at: ``exact_at(ys, xs)`` -> (K, n) the exact upsampled scores of every class at n output pixels.
        full: the whole upsample-and-max, used when too many pixels fail the bound (maps without structure).

    Returns per-pixel (max, argmax) of the bilinearly upsampled (``align_corners=False``) scores at ``size``,
    equal to the full computation's up to floating-point ties.
    """
    k = top_classes.shape[0]
    h, w = top_classes.shape[-2:]
    dev = top_classes.device
    bound = top_values[k:k + 1].float()
    a1 = (torch.arange(h, device=dev) + 1).clamp_(max=h - 1)
    b1 = (torch.arange(w, device=dev) + 1).clamp_(max=w - 1)
    # The corners of cell (a, b) are (a, b), (a, b1), (a1, b), (a1, b1); candidates are their top-k classes.
    pos = torch.arange(h * w, device=dev).view(h, w)
    corners = [pos, pos[:, b1], pos[a1], pos[a1][:, b1]]  # flat pixel index of each corner of each cell
    cand = torch.cat([top_classes.flatten(1)[:, c.flatten()].view(k, h, w) for c in corners])  # (4k, h, w)

    def at(c: torch.Tensor) -> torch.Tensor:  # candidate scores at one corner of every cell (no K-sized copy)
        return score_at(cand, c.expand_as(cand)).float()
    y0, _, wy = _bilinear_taps(h, size[0], dev)
    x0, _, wx = _bilinear_taps(w, size[1], dev)

    # Cells cover contiguous bands of pixels (the taps are monotonic): expanding is a repeat, not a gather.
    reps_y, reps_x = torch.bincount(y0, minlength=h), torch.bincount(x0, minlength=w)

    def expand(t: torch.Tensor) -> torch.Tensor:  # cell values -> the cell's pixels
        return t.repeat_interleave(reps_x, dim=-1).repeat_interleave(reps_y, dim=-2)

    fy, fx = wy.view(1, -1, 1), wx.view(1, 1, -1)
    top = torch.lerp(expand(at(corners[0])), expand(at(corners[1])), fx)
    bottom = torch.lerp(expand(at(corners[2])), expand(at(corners[3])), fx)
    best, which = torch.lerp(top, bottom, fy).max(dim=0)
    label = expand(cand).gather(0, which[None])[0]
    limit = resize(bound[None], size)[0, 0]  # the same mix of the corners' (k+1)-th scores
    unsure = (best <= limit).nonzero(as_tuple=True)
    if unsure[0].numel() > best.numel() // 20:  # a map without structure (noise): the full path is cheaper
        return full()
    if unsure[0].numel():
        m, i = exact_at(unsure[0], unsure[1]).max(dim=0)
        best[unsure] = m
        label[unsure] = i
    return best, label
