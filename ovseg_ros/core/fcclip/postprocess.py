"""Mask2Former/FC-CLIP inference post-processing: semantic, panoptic and instance outputs from query masks.

Rules from Mask2Former (Cheng et al., CVPR 2022, https://github.com/facebookresearch/Mask2Former,
``MaskFormer.semantic/panoptic/instance_inference``) with FC-CLIP's settings (object-mask threshold 0.0,
overlap threshold 0.8, https://github.com/bytedance/fc-clip):

* **masks** - stride-4 logits are upsampled bilinearly to the padded input, cropped to the resized image and
  resized bilinearly to the original image. We apply that separably (rows by a sparse matrix, columns by
  1-D ``F.interpolate``), band by band, so Q full-resolution masks never sit in memory.
* **semantic** - per pixel, class c scores ``S_c = sum_q p_q(c) * sigmoid(m_q)``; the label is the argmax.
  Our confidence is ``S_label / sum_q sigmoid(m_q)`` (the mask-weighted class probability, in [0, 1]).
* **panoptic** - keep queries whose best class is not void and beats ``object_mask_threshold``; each pixel
  goes to the kept query maximising ``score * sigmoid(m)``; query k's segment is where it wins and its own
  sigmoid >= 0.5, dropped if it wins less than ``overlap_threshold`` of its own mask (sigmoid >= 0.5);
  stuff segments of one class merge into one id, things get one id each.
* **instance** - the top-k (query, thing class) pairs by class probability, each scored by the class
  probability times its mask's mean sigmoid over the mask (logit > 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..models import sync_free
from ..segmenter import PanopticResult, Segment
from ..vocabulary import UNLABELED


def _interp_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out, n_in) matrix of 1-D linear interpolation, align_corners=False (the bilinear convention)."""
    eye = torch.eye(n_in, dtype=torch.float64, device=device).unsqueeze(1)  # n_in unit signals
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :].T


class SeparableResize:
    """Upsample (h, w) maps to the padded input, crop to the resized image, resize to the output image.

    Rows use the product of the two interpolation matrices, stored sparsely as (index, weight) pairs, so any
    band of output rows comes from a few low-resolution rows; columns then run through ``F.interpolate``
    (1-D linear, the same coordinate rule as bilinear) twice, upsample-crop-resize, on the band only.

    Args:
        mask_hw: size of the mask logits; padded_hw: network input size; crop_hw: image size inside it;
        out_hw: the original image size.
    """

    def __init__(self, mask_hw: tuple[int, int], padded_hw: tuple[int, int], crop_hw: tuple[int, int],
                 out_hw: tuple[int, int], device: torch.device) -> None:
        self.out_hw, self.pad_w, self.crop_w = out_hw, padded_hw[1], crop_hw[1]
        r = _interp_matrix(crop_hw[0], out_hw[0], device) @ _interp_matrix(mask_hw[0], padded_hw[0], device)[: crop_hw[0]]
        k = int((r != 0).sum(1).max().item())
        idx = r.abs().topk(k, dim=1).indices
        self.iy, self.wy = idx, r.gather(1, idx).float()

    def rows(self, x: torch.Tensor, y0: int, y1: int) -> torch.Tensor:
        """Output rows [y0, y1) of ``x`` (Q, h, w) resized -> (Q, y1 - y0, W)."""
        iy, wy = self.iy[y0:y1], self.wy[y0:y1]
        t = x.index_select(1, iy[:, 0]) * wy[None, :, 0, None]
        for j in range(1, iy.shape[1]):
            t = t + x.index_select(1, iy[:, j]) * wy[None, :, j, None]
        q, b, w = t.shape
        t = F.interpolate(t.reshape(q * b, 1, w), size=self.pad_w, mode="linear", align_corners=False)
        t = t[..., : self.crop_w]
        if self.crop_w != self.out_hw[1]:
            t = F.interpolate(t, size=self.out_hw[1], mode="linear", align_corners=False)
        return t.reshape(q, b, self.out_hw[1])

    def full(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x, 0, self.out_hw[0])


def _first_argmax(x: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum over dim 0 (torch.argmax's tie rule), given ``best = x.amax(0)``.

    ``amax`` plus this is several times faster on CPU than ``argmax``/``max`` over a leading dimension.
    """
    n = x.shape[0]
    rank = torch.arange(n, 0, -1, device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return (n - torch.where(x == best, rank, torch.zeros((), dtype=x.dtype, device=x.device)).amax(0)).long()


@dataclass(frozen=True)
class PostprocessOptions:
    """Thresholds and switches of :func:`postprocess` (the authors' values by default)."""

    object_mask_threshold: float = 0.0
    overlap_threshold: float = 0.8
    semantic: bool = True
    panoptic: bool = True
    #: Top (query, thing class) pairs kept as instances; 0 skips instance inference.
    instance_topk: int = 0
    #: Pixels whose semantic confidence is below this are UNLABELED.
    semantic_threshold: float = 0.0
    #: Elements (queries x rows x width) per band: small bands stay in cache (2**20 = 4 MB fp32 per tensor).
    band_elements: int = 1 << 20


@dataclass
class InstanceResult:
    """``masks`` (N, H, W) bool, ``class_ids`` (N,) int32, ``scores`` (N,) float32, best first."""

    masks: np.ndarray
    class_ids: np.ndarray
    scores: np.ndarray


@dataclass
class PostprocessOutput:
    labels: Optional[np.ndarray] = None  # (H, W) int32, UNLABELED below the threshold
    confidence: Optional[np.ndarray] = None  # (H, W) float32 in [0, 1]
    panoptic: Optional[PanopticResult] = None
    instances: Optional[InstanceResult] = None


def postprocess(
    mask_logits: torch.Tensor,
    class_probs: torch.Tensor,
    is_thing: torch.Tensor,
    resize: SeparableResize,
    options: PostprocessOptions = PostprocessOptions(),
) -> PostprocessOutput:
    """One image: ``mask_logits`` (Q, h, w), ``class_probs`` (Q, K + 1) void last, ``is_thing`` (K,) bool."""
    q, k1 = class_probs.shape
    k = k1 - 1
    probs = class_probs.float()
    masks = mask_logits.float()
    h, w = resize.out_hw
    dev = masks.device
    scores, classes = probs.max(-1)
    kept = (classes != k) & (scores > options.object_mask_threshold)
    is_thing = is_thing.to(dev)
    fixed = sync_free(dev) and options.instance_topk <= 0
    if fixed:  # every query stays in the tensors, the dropped ones masked: nothing read on the host
        keep = torch.arange(q, device=dev)
    else:
        keep = torch.nonzero(kept).flatten()

    inst_pairs = None
    if options.instance_topk > 0:
        flat = probs[:, :k].reshape(-1)
        top_s, top_i = flat.topk(min(options.instance_topk, flat.numel()))
        top_q, top_c = top_i // k, top_i % k
        thing = is_thing[top_c]
        inst_pairs = (top_s[thing], top_q[thing], top_c[thing])
        inst_queries = torch.unique(inst_pairs[1])
        inst_masks = torch.zeros((len(inst_queries), h, w), dtype=torch.bool, device=dev)
        inst_pos = torch.zeros(q, device=dev)
        inst_sig = torch.zeros(q, device=dev)

    sem_labels = torch.empty((h, w), dtype=torch.int32, device=dev) if options.semantic else None
    sem_conf = torch.empty((h, w), dtype=torch.float32, device=dev) if options.semantic else None
    pan_ids = torch.zeros((h, w), dtype=torch.long, device=dev)
    pan_own = torch.zeros((h, w), dtype=torch.bool, device=dev)
    pan_orig = torch.zeros(len(keep), device=dev)
    do_pan = options.panoptic and (fixed or len(keep) > 0)
    need_all = options.semantic or inst_pairs is not None
    keep_all = len(keep) == q
    # Fixed mode: a dropped query scores -1 per pixel, below every kept one's (>= 0), so it never wins.
    keep_scores = (torch.where(kept, scores, -1.0) if fixed else scores[keep])[:, None, None]
    src = masks if need_all or keep_all else masks[keep]
    per_row = max(src.shape[0], k if options.semantic else 0, 1) * w
    band = max(1, options.band_elements // per_row)

    for y0 in range(0, h, band):
        y1 = min(h, y0 + band)
        m = resize.rows(src, y0, y1)  # (Q or |keep|, b, W)
        if inst_pairs is not None:
            pos = m > 0
            inst_pos += pos.flatten(1).sum(1)
            inst_masks[:, y0:y1] = pos[inst_queries]
        sig = m.sigmoid_()  # in place: the logits are not needed any more
        if inst_pairs is not None:
            inst_sig += (sig * pos).flatten(1).sum(1)
        if options.semantic:
            per_class = torch.einsum("qk,qbw->kbw", probs[:, :k], sig)
            best = per_class.amax(0)
            sem_labels[y0:y1] = _first_argmax(per_class, best).to(torch.int32)
            sem_conf[y0:y1] = (best / sig.sum(0).clamp_min(1e-12)).clamp(0, 1)
        if do_pan:
            ks = sig.index_select(0, keep) if need_all and not keep_all else sig
            v = ks * keep_scores if not fixed else torch.where(keep_scores < 0, -1.0, ks * keep_scores)
            ids = _first_argmax(v, v.amax(0))
            pan_ids[y0:y1] = ids
            pan_own[y0:y1] = ks.gather(0, ids[None])[0] >= 0.5
            pan_orig += (ks >= 0.5).flatten(1).sum(1)

    if fixed:
        return _finish_on_device(sem_labels, sem_conf, pan_ids, pan_own, pan_orig, kept, scores, classes,
                                 is_thing, options)
    out = PostprocessOutput()
    if options.semantic:
        if options.semantic_threshold > 0:
            low = sem_conf < options.semantic_threshold
            sem_labels[low] = UNLABELED
            sem_conf[low] = 0.0  # the core's rule: confidence 0 where unlabeled by rule
        out.labels, out.confidence = sem_labels.cpu().numpy(), sem_conf.cpu().numpy()
    if options.panoptic:
        out.panoptic = _merge_panoptic(pan_ids, pan_own, pan_orig, scores[keep], classes[keep], is_thing,
                                       options.overlap_threshold) if do_pan else _empty_panoptic(h, w)
    if inst_pairs is not None:
        s, qs, cs = inst_pairs
        mask_score = inst_sig[qs] / (inst_pos[qs] + 1e-6)
        final = s * mask_score
        order = final.argsort(descending=True)
        rows = torch.searchsorted(inst_queries, qs[order])
        out.instances = InstanceResult(
            inst_masks[rows].cpu().numpy(), cs[order].to(torch.int32).cpu().numpy(), final[order].float().cpu().numpy()
        )
    return out


def _finish_on_device(
    sem_labels: Optional[torch.Tensor],
    sem_conf: Optional[torch.Tensor],
    ids: torch.Tensor,
    own: torch.Tensor,
    orig_area: torch.Tensor,
    kept: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    is_thing: torch.Tensor,
    options: PostprocessOptions,
) -> PostprocessOutput:
    """The end of :func:`postprocess` in the sync-free mode (GPU): :func:`_merge_panoptic` and
    :func:`_describe_segments` as fixed-shape tensors over all Q queries, then ONE host copy of the planes and
    the per-segment table (:func:`~ovseg_ros.core.segmenter.to_host_packed`). Same numbers as the host path.

    Segment ids: accepted queries in ascending order; a thing query or the first accepted query of a stuff class
    opens the next id, later stuff queries of that class join it (the host loop's rule, as a prefix count).
    """
    from ..segmenter import to_host_packed

    q = scores.shape[0]
    dev = ids.device
    h, w = ids.shape
    flat = ids.flatten()
    win = torch.zeros(q, dtype=torch.float64, device=dev).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
    inter = torch.zeros(q, dtype=torch.float64, device=dev).scatter_add_(0, flat, own.flatten().double())
    orig = orig_area.double()
    accept = kept & (win > 0) & (orig > 0) & (inter > 0) & (win / orig.clamp_min(1) >= options.overlap_threshold)
    thing = is_thing[classes.clamp(max=is_thing.shape[0] - 1)]  # void (index K) is never accepted
    rank = torch.arange(q, device=dev)
    same = (classes[:, None] == classes[None, :]) & accept[None, :] & (rank[None, :] < rank[:, None])  # (q, earlier)
    opens = accept & (thing | ~same.any(dim=1))
    new_id = torch.cumsum(opens.long(), 0)
    first = torch.where(same, rank[None, :], q).amin(dim=1).clamp(max=q - 1)  # first earlier same-class query
    sid = torch.where(opens, new_id, new_id[first])
    lut = torch.where(accept, sid, 0)  # query -> segment id (0 = none)
    seg_map = torch.where(own, lut[ids], torch.zeros_like(ids))
    n = q + 1  # ids 1..S, S <= q
    score_sum = torch.zeros(n, dtype=torch.float64, device=dev).scatter_add_(
        0, lut, torch.where(accept, scores.double() * inter, 0.0))
    weight = torch.zeros(n, dtype=torch.float64, device=dev).scatter_add_(0, lut, torch.where(accept, inter, 0.0))
    seg_class = torch.zeros(n, dtype=torch.long, device=dev).scatter_(0, torch.where(opens, sid, 0), classes)
    mean = torch.where(weight > 0, score_sum / weight.clamp_min(1e-300), 0.0).clamp(0, 1)
    sflat = seg_map.flatten()
    ys = torch.arange(h, device=dev).repeat_interleave(w, output_size=h * w)
    xs = torch.arange(w, device=dev).repeat(h)
    area = torch.zeros(n, dtype=torch.long, device=dev).scatter_add_(0, sflat, torch.ones_like(sflat))
    x0 = torch.full((n,), w, device=dev).scatter_reduce(0, sflat, xs, "amin")
    y0 = torch.full((n,), h, device=dev).scatter_reduce(0, sflat, ys, "amin")
    x1 = torch.full((n,), -1, device=dev).scatter_reduce(0, sflat, xs, "amax")
    y1 = torch.full((n,), -1, device=dev).scatter_reduce(0, sflat, ys, "amax")
    table = torch.stack([seg_class, is_thing[seg_class.clamp(max=is_thing.shape[0] - 1)].long(), area, x0, y0,
                         x1 - x0 + 1, y1 - y0 + 1, opens.sum().expand(n)])
    planes = [seg_map.to(torch.int32), table, mean]
    if sem_labels is not None:
        if options.semantic_threshold > 0:
            low = sem_conf < options.semantic_threshold
            sem_labels = torch.where(low, UNLABELED, sem_labels)
            sem_conf = torch.where(low, 0.0, sem_conf)
        planes += [sem_labels, sem_conf]
    host = to_host_packed(*planes)
    seg_np, table_np, mean_np = host[:3]
    count = int(table_np[7, 0])
    segments = [Segment(id=i, class_id=int(table_np[0, i]), is_thing=bool(table_np[1, i]), score=float(mean_np[i]),
                        area=int(table_np[2, i]), bbox=tuple(int(v) for v in table_np[3:7, i]))  # type: ignore[arg-type]
                for i in range(1, count + 1)]
    out = PostprocessOutput(panoptic=PanopticResult(seg_np, segments))
    if sem_labels is not None:
        out.labels, out.confidence = host[3], host[4]
    return out


def _empty_panoptic(h: int, w: int) -> PanopticResult:
    return PanopticResult(np.zeros((h, w), dtype=np.int32), [])


def _merge_panoptic(
    ids: torch.Tensor,
    own: torch.Tensor,
    orig_area: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    is_thing: torch.Tensor,
    overlap_threshold: float,
) -> PanopticResult:
    """Segment ids from the per-pixel winning kept query ``ids`` and whether its own mask covers the pixel.

    Equals the authors' per-query loop: query k's candidate mask is ``ids == k & own``; it needs a nonzero
    area, and ``area(ids == k) / area(sigmoid_k >= 0.5) >= overlap_threshold``.
    """
    n = scores.shape[0]
    win_area = torch.bincount(ids.flatten(), minlength=n).cpu().numpy()
    inter = torch.bincount(ids[own], minlength=n).cpu().numpy()
    orig = orig_area.cpu().numpy()
    cls_np = classes.cpu().numpy()
    thing_np = is_thing.cpu().numpy()
    score_np = scores.float().cpu().numpy()
    lut = np.zeros(n + 1, dtype=np.int64)  # query -> segment id (0 = none); index n unused
    stuff_ids: dict[int, int] = {}
    seg_class: list[int] = []
    seg_score_sum: list[float] = []
    seg_weight: list[float] = []
    for qk in range(n):
        if win_area[qk] == 0 or orig[qk] == 0 or inter[qk] == 0:
            continue
        if win_area[qk] / orig[qk] < overlap_threshold:
            continue
        c = int(cls_np[qk])
        if not thing_np[c] and c in stuff_ids:
            sid = stuff_ids[c]
        else:
            seg_class.append(c)
            seg_score_sum.append(0.0)
            seg_weight.append(0.0)
            sid = len(seg_class)
            if not thing_np[c]:
                stuff_ids[c] = sid
        lut[qk] = sid
        seg_score_sum[sid - 1] += float(score_np[qk]) * float(inter[qk])
        seg_weight[sid - 1] += float(inter[qk])
    seg_map = torch.where(own, torch.as_tensor(lut, device=ids.device)[ids], torch.zeros_like(ids))
    segments = _describe_segments(seg_map, seg_class, seg_score_sum, seg_weight, thing_np)
    return PanopticResult(seg_map.to(torch.int32).cpu().numpy(), segments)


def _describe_segments(seg: torch.Tensor, seg_class: list[int], score_sum: list[float], weight: list[float],
                       thing: np.ndarray) -> list[Segment]:
    """Area and (x, y, w, h) box of segments 1..S of ``seg`` (H, W) in one pass over the pixels."""
    n = len(seg_class) + 1
    h, w = seg.shape
    flat = seg.flatten()
    ys = torch.arange(h, device=seg.device).repeat_interleave(w)
    xs = torch.arange(w, device=seg.device).repeat(h)
    areas = torch.bincount(flat, minlength=n).cpu().tolist()
    lo = [torch.full((n,), size, device=seg.device).scatter_reduce(0, flat, c, "amin") for c, size in ((xs, w), (ys, h))]
    hi = [torch.full((n,), -1, device=seg.device).scatter_reduce(0, flat, c, "amax") for c in (xs, ys)]
    x0, y0, x1, y1 = (t.cpu().tolist() for t in (*lo, *hi))
    segments = []
    for i, c in enumerate(seg_class, start=1):
        score = score_sum[i - 1] / weight[i - 1] if weight[i - 1] > 0 else 0.0
        segments.append(Segment(
            id=i, class_id=c, is_thing=bool(thing[c]), score=float(min(max(score, 0.0), 1.0)), area=int(areas[i]),
            bbox=(int(x0[i]), int(y0[i]), int(x1[i] - x0[i] + 1), int(y1[i] - y0[i] + 1)),
        ))
    return segments
