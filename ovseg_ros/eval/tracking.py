"""Tracking and flicker metrics of a segmented video against ground truth (bench_tracking, tests).

Tracking quality comes from TrackEval (Luiten et al., "HOTA: A Higher Order Metric for Evaluating Multi-Object
Tracking", IJCV 2021, github.com/JonathonLuiten/TrackEval; PyPI ``trackeval`` 1.3.0, which runs on numpy 2):
HOTA (mean over the IoU thresholds 0.05..0.95), DetA, AssA, CLEAR MOTA and identity switches, IDF1, with mask
IoU as the similarity (the MOTS setting). Ground-truth objects smaller than ``min_area`` visible pixels are
left out (a segmenter that drops segments below that size cannot find them).

Flicker: the share of pixels whose published label changes between two consecutive delivered frames where the
ground-truth label does not. Lag: at pixels where the ground truth changes and the unfiltered labels follow
at once, the frames until the published (filtered) labels follow too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


def mask_iou(gt: np.ndarray, pred: np.ndarray, gt_ids: np.ndarray, pred_ids: np.ndarray) -> np.ndarray:
    """(len(gt_ids), len(pred_ids)) IoU between the masks of two id maps, from one bincount."""
    if gt_ids.size == 0 or pred_ids.size == 0:
        return np.zeros((gt_ids.size, pred_ids.size))
    g = np.searchsorted(gt_ids, gt.ravel())
    g = np.where((g < gt_ids.size) & (gt_ids[np.minimum(g, gt_ids.size - 1)] == gt.ravel()), g, gt_ids.size)
    p = np.searchsorted(pred_ids, pred.ravel())
    p = np.where((p < pred_ids.size) & (pred_ids[np.minimum(p, pred_ids.size - 1)] == pred.ravel()), p, pred_ids.size)
    n_g, n_p = gt_ids.size + 1, pred_ids.size + 1
    inter = np.bincount(g * n_p + p, minlength=n_g * n_p).reshape(n_g, n_p)
    area_g, area_p = inter.sum(1)[:-1], inter.sum(0)[:-1]
    inter = inter[:-1, :-1].astype(np.float64)
    return inter / np.maximum(area_g[:, None] + area_p[None, :] - inter, 1)


@dataclass
class TrackingAccumulator:
    """Collects one sequence frame by frame; :meth:`metrics` runs TrackEval on it."""

    min_area: int = 0
    _gt: list = field(default_factory=list)
    _pred: list = field(default_factory=list)
    _sim: list = field(default_factory=list)

    def add(self, gt_instances: np.ndarray, segment_ids: np.ndarray, track_of_segment: dict[int, int]) -> None:
        """One frame: ground-truth object ids (0 = none), the published segment id map and {segment id: track id}
        for the tracked (thing) segments."""
        ids, counts = np.unique(gt_instances, return_counts=True)
        gt_ids = ids[(ids > 0) & (counts >= max(self.min_area, 1))]
        seg = np.array(sorted(track_of_segment), np.int64)
        sim = mask_iou(gt_instances, segment_ids, gt_ids, seg)
        self._gt.append(gt_ids)
        self._pred.append(np.array([track_of_segment[s] for s in seg.tolist()], np.int64))
        self._sim.append(sim)

    def metrics(self) -> dict[str, float]:
        from trackeval.metrics import CLEAR, HOTA, Identity

        gt_all = np.unique(np.concatenate(self._gt)) if self._gt else np.zeros(0, np.int64)
        pr_all = np.unique(np.concatenate(self._pred)) if self._pred else np.zeros(0, np.int64)
        data: dict[str, Any] = {
            "num_timesteps": len(self._gt),
            "num_gt_dets": int(sum(g.size for g in self._gt)),
            "num_tracker_dets": int(sum(p.size for p in self._pred)),
            "num_gt_ids": int(gt_all.size),
            "num_tracker_ids": int(pr_all.size),
            "gt_ids": [np.searchsorted(gt_all, g) for g in self._gt],
            "tracker_ids": [np.searchsorted(pr_all, p) for p in self._pred],
            "similarity_scores": self._sim,
        }
        quiet = {"PRINT_CONFIG": False}
        hota = HOTA(quiet).eval_sequence(data)
        clear = CLEAR(quiet).eval_sequence(data)
        ident = Identity(quiet).eval_sequence(data)
        n = max(data["num_gt_dets"], 1)
        return {
            "HOTA": float(np.mean(hota["HOTA"])),
            "DetA": float(np.mean(hota["DetA"])),
            "AssA": float(np.mean(hota["AssA"])),
            "MOTA": float(clear["MOTA"]),
            "IDSW": int(clear["IDSW"]),
            "IDF1": float(ident["IDF1"]),
            "IDSW_per_100": 100.0 * float(clear["IDSW"]) / n,
            "gt_dets": int(data["num_gt_dets"]),
            "gt_ids": int(gt_all.size),
            "pred_ids": int(pr_all.size),
        }


@dataclass
class FlickerAccumulator:
    """Flicker of the published labels (and the lag behind true changes), frame by frame."""

    _prev_gt: Optional[np.ndarray] = None
    _prev_pub: Optional[np.ndarray] = None
    _flips: int = 0
    _still: int = 0
    #: pixels waiting for the published labels to follow a true change: (flat index array, new label, frames)
    _waiting: list = field(default_factory=list)
    lags: list = field(default_factory=list)

    def add(self, gt: np.ndarray, published: np.ndarray, raw: Optional[np.ndarray] = None) -> None:
        gt_f, pub_f = gt.ravel(), published.ravel()
        if self._prev_gt is not None and self._prev_pub is not None:
            still = gt_f == self._prev_gt
            self._still += int(still.sum())
            self._flips += int((still & (pub_f != self._prev_pub)).sum())
            # follow the pixels that wait; a pixel whose ground truth changes again is no longer followed
            keep = []
            for idx, label, frames in self._waiting:
                valid = gt_f[idx] == label
                done = valid & (pub_f[idx] == label)
                self.lags.extend([frames] * int(done.sum()))
                rest = idx[valid & ~done]
                if rest.size and frames < 30:
                    keep.append((rest, label[valid & ~done], frames + 1))
            self._waiting = keep
            if raw is not None:
                changed = np.flatnonzero((gt_f != self._prev_gt) & (raw.ravel() == gt_f))
                follows = pub_f[changed] == gt_f[changed]
                self.lags.extend([0] * int(follows.sum()))
                rest = changed[~follows]
                if rest.size:
                    self._waiting.append((rest, gt_f[rest], 1))
        self._prev_gt, self._prev_pub = gt_f.copy(), pub_f.copy()

    def metrics(self) -> dict[str, float]:
        lags = np.array(self.lags or [0])
        return {
            "flicker": self._flips / max(self._still, 1),
            "lag_mean": float(lags.mean()),
            "lag_p99": float(np.percentile(lags, 99)),
            "lag_max": int(lags.max()),
        }


def evaluate_synthetic(scene: Any, filter_method: str = "none", filter_frames: int = 3, min_area: int = 16,
                       max_age_s: float = 3.0, tracking: bool = True) -> dict[str, float]:
    """Segment a :class:`~.video_synth.SceneConfig` sequence with ``color_key`` and score it: the node's
    per-frame order (:class:`~ovseg_ros.core.video.VideoState`: filter, panoptic from the labels, tracker)."""
    import time

    from ..core.postprocess import panoptic_from_semantic
    from ..core.segmenter import build_segmenter
    from ..core.temporal import FilterConfig
    from ..core.video import VideoState
    from .video_synth import color_key_options, generate, vocabulary

    vocab = vocabulary()
    seg = build_segmenter("color_key", "realtime", color_key_options())
    state = seg.encode_vocabulary(vocab)
    video = VideoState()
    video.configure(tracking, max_age_s, FilterConfig(filter_method, frames=filter_frames))
    track_acc, flicker_acc = TrackingAccumulator(min_area=min_area), FlickerAccumulator()
    ms: list[float] = []
    for frame in generate(scene):
        raw = seg.segment(frame.image, state)
        raw.labels = frame.corrupt(raw.labels)
        filtered = video.filter_result(raw, frame.image, frame.stamp_ns, context=vocab.revision)
        panoptic = panoptic_from_semantic(filtered.labels, filtered.confidence, vocab, min_area=min_area)
        t0 = time.perf_counter()
        ids = video.track(panoptic, frame.stamp_ns, context=vocab.revision)
        ms.append((time.perf_counter() - t0) * 1e3)
        tracks = {s.id: int(t) for s, t in zip(panoptic.segments, ids if ids is not None else []) if s.is_thing}
        track_acc.add(frame.instances, panoptic.segment_ids, tracks)
        flicker_acc.add(frame.labels, filtered.labels, raw.labels)
    out = {**track_acc.metrics(), **flicker_acc.metrics(), "frames": len(track_acc._gt)}
    out["track_ms_mean"] = float(np.mean(ms)) if ms else 0.0
    return out
