"""Panoptic quality (PQ, SQ, RQ), as defined for COCO panoptic.

Kirillov et al., "Panoptic Segmentation", CVPR 2019, and the reference evaluation of the COCO panoptic
challenge (https://github.com/cocodataset/panopticapi, ``pq_compute``). Our own implementation of the same
rules:

* A predicted and a ground-truth segment of the same class match when their IoU is above 0.5 (then the
  match is unique). The union leaves out the predicted pixels that fall on void (unannotated) ground truth.
* Crowd regions (``iscrowd``) are never matched; an unmatched prediction is not a false positive when more
  than half of it lies on void or on a crowd region of its own class. Unmatched non-crowd ground-truth
  segments are false negatives.
* Per class: PQ = sum(IoU of matches) / (TP + FP/2 + FN/2), SQ = sum(IoU) / TP, RQ = TP / (TP + FP/2 + FN/2);
  the averages (all / things / stuff) run over the classes with TP + FP + FN > 0.

To make a sharded run add up exactly like a single-process run, each match's IoU is stored as an integer
in units of 1e-9 (:data:`IOU_SCALE`); all statistics are then integers and sums are order-independent. The
rounding moves PQ by less than 1e-9.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

IOU_SCALE = 10**9
#: Columns of the per-class statistics array.
TP, FP, FN, IOU = 0, 1, 2, 3


@dataclass(frozen=True)
class SegmentInfo:
    """One segment of a panoptic map: its class (0-based, dataset order) and whether it is a crowd region."""

    class_id: int
    iscrowd: bool = False


def pq_image_stats(
    gt_ids: np.ndarray,
    gt_segments: Mapping[int, SegmentInfo],
    pred_ids: np.ndarray,
    pred_segments: Mapping[int, SegmentInfo],
    num_classes: int,
) -> np.ndarray:
    """(num_classes, 4) int64 [TP, FP, FN, IoU sum x IOU_SCALE] of one image.

    ``gt_ids`` / ``pred_ids``: (H, W) segment ids; pixels whose id is not in the matching ``*_segments``
    (id 0 in COCO PNGs) are void (ground truth) or unassigned (prediction). ``gt_segments`` must be in the
    annotation's order (``segments_info``): of two crowd regions of one class the last one is used.
    """
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"prediction {pred_ids.shape} and ground truth {gt_ids.shape} differ in size")
    for name, segs in (("ground-truth", gt_segments), ("predicted", pred_segments)):
        for sid, info in segs.items():
            if not 0 <= info.class_id < num_classes:
                raise ValueError(f"{name} segment {sid} has class {info.class_id}, outside 0..{num_classes - 1}")
    stats = np.zeros((num_classes, 4), dtype=np.int64)
    # Dense re-indexing: 0 = void/unassigned, 1..G / 1..P = the listed segments.
    gt_keys = sorted(gt_segments)
    pred_keys = sorted(pred_segments)
    g = _reindex(gt_ids, gt_keys)
    p = _reindex(pred_ids, pred_keys)
    ng, np_ = len(gt_keys) + 1, len(pred_keys) + 1
    joint = np.bincount((g.ravel() * np_ + p.ravel()), minlength=ng * np_).reshape(ng, np_)
    gt_area = joint.sum(axis=1)
    pred_area = joint.sum(axis=0)
    gt_info = [None] + [gt_segments[k] for k in gt_keys]
    pred_info = [None] + [pred_segments[k] for k in pred_keys]
    gt_matched = np.zeros(ng, dtype=bool)
    pred_matched = np.zeros(np_, dtype=bool)
    for gi, pi in zip(*np.nonzero(joint[1:, 1:])):
        gi, pi = gi + 1, pi + 1
        gs, ps = gt_info[gi], pred_info[pi]
        if gs.iscrowd or gs.class_id != ps.class_id:
            continue
        inter = int(joint[gi, pi])
        union = int(pred_area[pi] + gt_area[gi] - inter - joint[0, pi])
        if inter * 2 > union:  # IoU > 0.5, decided exactly in integers
            stats[gs.class_id, TP] += 1
            stats[gs.class_id, IOU] += (inter * IOU_SCALE + union // 2) // union
            gt_matched[gi] = pred_matched[pi] = True
    # One crowd region per class: panopticapi's pq_compute_single_core fills its crowd_labels_dict while
    # walking segments_info in the JSON's order, so with two crowd segments of a class the LAST listed one
    # counts. ``gt_segments`` keeps that order (the readers build it from the JSON list in order).
    dense_of = {k: i + 1 for i, k in enumerate(gt_keys)}
    crowd_of_class: dict[int, int] = {}
    for sid, gs in gt_segments.items():
        if gs.iscrowd:
            crowd_of_class[gs.class_id] = dense_of[sid]
    for gi in range(1, ng):
        gs = gt_info[gi]
        if not gs.iscrowd and not gt_matched[gi]:
            stats[gs.class_id, FN] += 1
    for pi in range(1, np_):
        if pred_matched[pi] or pred_area[pi] == 0:
            continue
        ps = pred_info[pi]
        ignored = int(joint[0, pi])
        if ps.class_id in crowd_of_class:
            ignored += int(joint[crowd_of_class[ps.class_id], pi])
        if ignored * 2 > pred_area[pi]:
            continue
        stats[ps.class_id, FP] += 1
    return stats


def _reindex(ids: np.ndarray, keys: Sequence[int]) -> np.ndarray:
    """Map segment ids to 1..len(keys) in ``keys`` order; anything else to 0."""
    if not keys:
        return np.zeros(ids.shape, dtype=np.int64)
    k = np.asarray(keys, dtype=np.int64)
    flat = ids.astype(np.int64).ravel()
    pos = np.searchsorted(k, flat)
    pos_c = np.minimum(pos, len(k) - 1)
    hit = k[pos_c] == flat
    return np.where(hit, pos_c + 1, 0).reshape(ids.shape)


@dataclass
class PanopticScores:
    pq: float
    sq: float
    rq: float
    n: int


def pq_average(stats: np.ndarray, is_thing: Sequence[bool] | None = None, which: str = "all") -> PanopticScores:
    """PQ/SQ/RQ (in [0, 1]) averaged over the classes of ``which`` (all, things, stuff) that occur."""
    pq = sq = rq = 0.0
    n = 0
    for c in range(stats.shape[0]):
        if which != "all" and is_thing is not None and bool(is_thing[c]) != (which == "things"):
            continue
        tp, fp, fn, iou_q = (int(v) for v in stats[c])
        if tp + fp + fn == 0:
            continue
        iou = iou_q / IOU_SCALE
        denom = tp + 0.5 * fp + 0.5 * fn
        pq += iou / denom
        sq += iou / tp if tp else 0.0
        rq += tp / denom
        n += 1
    if n == 0:
        return PanopticScores(float("nan"), float("nan"), float("nan"), 0)
    return PanopticScores(pq / n, sq / n, rq / n, n)


def panoptic_report(stats: np.ndarray, class_names: Sequence[str], is_thing: Sequence[bool]) -> dict:
    """JSON-ready PQ/SQ/RQ for all/things/stuff and per class (NaN -> None)."""
    out: dict = {}
    for which in ("all", "things", "stuff"):
        s = pq_average(stats, is_thing, which)
        out[which] = {"PQ": _num(s.pq), "SQ": _num(s.sq), "RQ": _num(s.rq), "classes": s.n}
    per_class = []
    for c, name in enumerate(class_names):
        tp, fp, fn, iou_q = (int(v) for v in stats[c])
        denom = tp + 0.5 * fp + 0.5 * fn
        iou = iou_q / IOU_SCALE
        per_class.append({"id": c, "name": name, "is_thing": bool(is_thing[c]), "TP": tp, "FP": fp, "FN": fn,
                          "PQ": iou / denom if denom else None, "SQ": iou / tp if tp else None,
                          "RQ": tp / denom if denom else None})
    out["per_class"] = per_class
    return out


def _num(x: float) -> float | None:
    return None if x != x else float(x)
