"""Persistent instance ids across frames: a ROS-free multi-object tracker for panoptic segments.

Association is tracking-by-segmentation in the spirit of SORT (Bewley et al., "Simple Online and Realtime
Tracking", ICIP 2016, github.com/abewley/sort) with masks instead of boxes, as in the MOTS baselines
(Voigtlaender et al., "MOTS: Multi-Object Tracking and Segmentation", CVPR 2019,
github.com/VisualComputingInstitute/TrackR-CNN): per camera, within a class, optimal assignment
(``scipy.optimize.linear_sum_assignment``) on mask IoU, in two stages:

1. segments of this frame against the tracks seen in the previous frame: every overlap at once from one
   ``np.bincount`` over ``prev * (n + 1) + cur`` on a strided sample of the id map (about 20k pixels
   whatever the resolution);
2. what is left against tracks not matched (lost for a dropped frame, a missed detection or an occlusion):
   their last mask, shifted by their velocity over the time they were lost, against this frame's segments.

An optional cue gates both stages: the 3D centroid of each segment (from the depth image) must lie within
``max_speed_mps * dt + centroid_slack_m`` of the track's. A third stage takes objects back that come into
view through the edge where their track left it. Tracks not matched are kept ``max_age_s`` seconds
of *stamp* time (ROS time of the frames, never wall time), tentative ones (seen in one frame only: speckle, the
second half of a split) only while matched at once; a new context (vocabulary/model), a change of image
size or a stamp going backwards resets every track, counted per reason (:attr:`InstanceTracker.resets`).

Only thing segments are tracked; stuff segments (one per class) get track id 0 ("untracked"): their class is
their identity. Track ids are unique for the tracker's lifetime (never reused after a reset), 1..2**32-1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Optional

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from . import depth as dp
from .segmenter import PanopticResult

#: Reset reasons (keys of :attr:`InstanceTracker.resets`).
RESET_REASONS = ("vocabulary", "deactivate", "time_jump_back", "image_size", "parameters")
#: Pixels sampled per frame for the overlaps (stride chosen per image size).
SAMPLE_PIXELS = 20_000
#: Pixels back-projected per frame for the 3D centroids (a gate of tens of centimetres: a few thousand points
#: are plenty, and this sample is what the cue costs; a segment too small to be sampled is gated by its mask).
CENTROID_SAMPLE_PIXELS = 5_000


@dataclass
class _Track:
    id: int
    class_id: int
    last_ns: int
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 (full resolution, inclusive)
    center: tuple[float, float]  # x, y (full resolution)
    velocity: Optional[tuple[float, float]] = None  # px per second
    centroid: Optional[np.ndarray] = None  # (3,) metres, None when unknown
    small: Optional[np.ndarray] = None  # the sampled index map of the frame it was last seen in
    index: int = -1  # its segment index in that map
    hits: int = 1  # frames it was matched in (1: tentative)


@dataclass
class TrackerConfig:
    """Options of :class:`InstanceTracker` (node parameter ``track_max_age``)."""

    max_age_s: float = 3.0
    #: A pair below this mask IoU is never associated.
    min_iou: float = 0.1
    #: 3D gate: a segment whose centroid is farther than ``max_speed_mps * dt + centroid_slack_m`` from the
    #: track's is not that track.
    max_speed_mps: float = 3.0
    centroid_slack_m: float = 0.3
    #: An object coming back into view through the edge where its track left is that track when their extents
    #: along the edge overlap by at least this share of the shorter one.
    min_edge_overlap: float = 0.5

    def __post_init__(self) -> None:
        if not (self.max_age_s >= 0.0 and np.isfinite(self.max_age_s)):
            raise ValueError(f"max_age_s must be a finite number >= 0, got {self.max_age_s}")
        if not 0.0 < self.min_iou <= 1.0:
            raise ValueError(f"min_iou must be in (0, 1], got {self.min_iou}")


@dataclass
class TrackerStats:
    """Counters read by diagnostics."""

    frames: int = 0
    created: int = 0
    resets: dict[str, int] = field(default_factory=lambda: {r: 0 for r in RESET_REASONS})
    last_reset: str = ""


def sample_stride(height: int, width: int, target: int = SAMPLE_PIXELS) -> int:
    """Stride of the id-map sample: about ``target`` pixels (1 for small images)."""
    return max(1, int(round(float(np.sqrt(height * width / max(target, 1))))))


def segment_centroids(segment_ids: np.ndarray, xyz: np.ndarray, ids: np.ndarray, stride: int = 4) -> np.ndarray:
    """(len(ids), 3) mean 3D point of each segment id (NaN where it has no valid point).

    ``xyz``: (H, W, 3) organised points pixel-aligned with ``segment_ids`` (NaN where depth is invalid), e.g. the
    x/y/z of ``~/semantic/points``. Sampled with ``stride`` (the centroid is a gate, not a measurement).
    """
    if xyz.shape[:2] != segment_ids.shape:
        raise ValueError(f"points {xyz.shape[:2]} and segment ids {segment_ids.shape} must have one size")
    ids = np.asarray(ids, np.int64)
    out = np.full((ids.size, 3), np.nan, np.float64)
    if ids.size == 0:
        return out
    seg = segment_ids[::stride, ::stride].ravel().astype(np.int64)
    pts = xyz[::stride, ::stride].reshape(-1, 3)
    if ids.min() >= 0 and max(int(ids.max()), int(seg.max(initial=0))) < 1 << 20:
        # segment ids are small non-negative integers: a look-up table instead of a search
        lut = np.full(max(int(ids.max()), int(seg.max(initial=0))) + 1, -1, np.int64)
        lut[ids] = np.arange(ids.size)
        slot = lut[seg]
    else:
        order = np.argsort(ids)
        pos = np.clip(np.searchsorted(ids[order], seg), 0, ids.size - 1)
        slot = np.where(ids[order][pos] == seg, order[pos], -1)
    keep = slot >= 0
    for k in range(3):
        keep &= np.isfinite(pts[:, k])
    slot = slot[keep]
    n = np.bincount(slot, minlength=ids.size).astype(np.float64)
    kept = pts[keep].astype(np.float64)
    for k in range(3):
        s = np.bincount(slot, weights=kept[:, k], minlength=ids.size)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, k] = np.where(n > 0, s / np.maximum(n, 1), np.nan)
    return out


@dataclass(frozen=True, eq=False)  # compared by identity (holds an array)
class DepthCue:
    """A depth image registered to a frame's colour camera, for the 3D gate of :class:`InstanceTracker`.

    ``metres``: (h, w) float32 metres, NaN where invalid (:func:`.depth.depth_msg_to_metres`), at any resolution
    with the labels' aspect ratio; ``intrinsics``: the depth camera's, at any resolution (rescaled here);
    points outside ``[min_depth, max_depth]`` are not used (the semantic cloud's range).
    """

    metres: np.ndarray
    intrinsics: dp.Intrinsics
    min_depth: float = 0.1
    max_depth: float = 10.0


def depth_centroids(panoptic: PanopticResult, cue: DepthCue, target: int = CENTROID_SAMPLE_PIXELS) -> np.ndarray:
    """(S, 3) mean 3D point (optical frame, metres) of each segment of ``panoptic`` (NaN rows: no valid point).

    Back-projects only a nearest-neighbour sample of about ``target`` pixels (:func:`.depth.resample_nearest`
    of the depth and of the id map to one small grid, :func:`.depth.project` with the intrinsics rescaled to it):
    the centroid gates the association, a sample is enough (cost: docs/benchmarks.md, issue 19).
    Raises :class:`.depth.DepthError` for a depth image or intrinsics that cannot be the frame's.
    """
    seg = panoptic.segment_ids
    h, w = seg.shape
    dh, dw = cue.metres.shape[:2]
    dp.check_aspect((dh, dw), (h, w), "depth image")
    dp.check_aspect((cue.intrinsics.height, cue.intrinsics.width), (h, w), "camera_info")
    stride = sample_stride(h, w, target)
    sh, sw = max(1, h // stride), max(1, w // stride)
    small_ids = dp.resample_nearest(seg, sh, sw)
    xyz = dp.project(dp.resample_nearest(cue.metres, sh, sw), cue.intrinsics.scaled(sw, sh),
                     cue.min_depth, cue.max_depth)
    return segment_centroids(small_ids, xyz, np.array([s.id for s in panoptic.segments], np.int64), stride=1)


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of inclusive boxes x0, y0, x1, y1."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0 + 1, 0, None) * np.clip(y1 - y0 + 1, 0, None)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _edges(box: tuple, w: int, h: int) -> set[str]:
    """The image edges an inclusive box (x0, y0, x1, y1) touches."""
    x0, y0, x1, y1 = box
    return {e for e, on in (("left", x0 <= 0), ("right", x1 >= w - 1), ("top", y0 <= 0), ("bottom", y1 >= h - 1)) if on}


def _edge_overlap(a: tuple, b: tuple, w: int, h: int) -> float:
    """Best overlap of two boxes' extents along an image edge both touch, over the shorter extent (a sliver of
    an object entering or leaving has a short extent); 0 when they share no edge."""
    best = 0.0
    for e in _edges(a, w, h) & _edges(b, w, h):
        lo, hi = (1, 3) if e in ("left", "right") else (0, 2)
        inter = min(a[hi], b[hi]) - max(a[lo], b[lo]) + 1
        shorter = min(a[hi] - a[lo], b[hi] - b[lo]) + 1
        best = max(best, max(inter, 0) / max(shorter, 1))
    return best


def _assign(score: np.ndarray, min_score: float) -> list[tuple[int, int]]:
    """Optimal one-to-one pairs (row, col) maximising ``score``; pairs below ``min_score`` are dropped."""
    if score.size == 0:
        return []
    ok = score >= min_score
    if (ok.sum(axis=0) <= 1).all() and (ok.sum(axis=1) <= 1).all():  # unambiguous (the usual case): no solver
        return [(int(r), int(c)) for r, c in zip(*np.nonzero(ok))]
    rows, cols = linear_sum_assignment(score, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if score[r, c] >= min_score]


class InstanceTracker:
    """Per-camera tracker of panoptic thing segments. See the module docstring.

    Not thread-safe: one publishing thread calls :meth:`update`; :attr:`stats` may be read from others.
    """

    def __init__(self, config: Optional[TrackerConfig] = None) -> None:
        self.config = config or TrackerConfig()
        self.stats = TrackerStats()
        self._next_id = 1
        self._tracks: list[_Track] = []
        self._prev: list[_Track] = []  # tracks matched in the previous frame, by segment index there
        self._prev_small: Optional[np.ndarray] = None
        self._last_ns: Optional[int] = None
        self._context: Any = None
        self._shape: Optional[tuple[int, int]] = None

    # --- state ---------------------------------------------------------------------------------------
    @property
    def num_tracks(self) -> int:
        return len(self._tracks)

    def reset(self, reason: str) -> None:
        """Forget every track (ids are never reused); ``reason`` is counted (one of :data:`RESET_REASONS`)."""
        if reason not in self.stats.resets:
            raise ValueError(f"unknown reset reason {reason!r}; one of {', '.join(RESET_REASONS)}")
        had_state = self._last_ns is not None
        self._tracks, self._prev, self._prev_small = [], [], None
        self._last_ns, self._shape = None, None
        if had_state:  # a reset of an empty tracker says nothing
            self.stats.resets[reason] += 1
            self.stats.last_reset = reason

    def _new_id(self) -> int:
        tid = self._next_id
        self._next_id = self._next_id + 1 if self._next_id < 2**32 - 1 else 1
        self.stats.created += 1
        return tid

    # --- per frame -----------------------------------------------------------------------------------
    def update(
        self,
        panoptic: PanopticResult,
        stamp_ns: int,
        context: Hashable = None,
        centroids: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """Track ids (uint32, one per ``panoptic.segments`` entry; 0 for stuff) of this frame.

        ``stamp_ns``: the frame's stamp (ROS time). ``context``: anything identifying what produced the
        segments (vocabulary revision, model); a change resets the tracks (counted as "vocabulary").
        ``centroids``: optional (S, 3) 3D centroid per segment in metres (NaN rows where unknown).
        """
        ids_map = panoptic.segment_ids
        if ids_map.ndim != 2:
            raise ValueError(f"segment ids must be (H, W), got {ids_map.shape}")
        segments = panoptic.segments
        if centroids is not None and np.shape(centroids) != (len(segments), 3):
            raise ValueError(f"centroids must be ({len(segments)}, 3), got {np.shape(centroids)}")
        stamp_ns = int(stamp_ns)
        if self._last_ns is not None:
            if context != self._context:
                self.reset("vocabulary")
            elif ids_map.shape != self._shape:
                self.reset("image_size")
            elif stamp_ns < self._last_ns:
                self.reset("time_jump_back")
        self._context, self._shape = context, ids_map.shape
        self.stats.frames += 1
        max_age_ns = int(self.config.max_age_s * 1e9)
        # Tracks of the previous frame always stay candidates (max_age bounds the time *unmatched*); a track seen
        # once (tentative: often speckle or half of a split) only while matched at once.
        self._tracks = [t for t in self._tracks
                        if t.last_ns == self._last_ns or (t.hits > 1 and stamp_ns - t.last_ns <= max_age_ns)]
        alive = {id(t) for t in self._tracks}
        self._prev = [t if id(t) in alive else None for t in self._prev]  # type: ignore[misc]
        self._last_ns = stamp_ns

        out = np.zeros(len(segments), np.uint32)
        thing = [k for k, s in enumerate(segments) if s.is_thing]
        meta = np.array([(s.id, s.class_id, *s.bbox) for s in segments if s.is_thing], np.int64).reshape(-1, 6)
        h, w = ids_map.shape
        stride = sample_stride(h, w)
        small_ids = np.ascontiguousarray(ids_map[::stride, ::stride])
        # this frame's thing segments as 0..n-1 in the sample; -1 elsewhere
        n = len(thing)
        seg_ids = meta[:, 0]
        if small_ids.dtype == np.int32:
            lo, hi = (int(v) for v in cv2.minMaxLoc(small_ids)[:2])
        else:
            lo, hi = int(small_ids.min(initial=0)), int(small_ids.max(initial=0))
        max_id = max(hi, int(seg_ids.max(initial=0)))
        if lo >= 0 and int(seg_ids.min(initial=0)) >= 0 and max_id < 4 * small_ids.size + 65536:
            lut = np.full(max_id + 2, -1, np.int16 if n < 32767 else np.int32)
            lut[seg_ids] = np.arange(n)
            cur = lut[small_ids]
        else:  # sparse or negative ids: a sorted search
            cur = np.full(small_ids.shape, -1, np.int32)
            if n:
                order = np.argsort(seg_ids)
                pos = np.clip(np.searchsorted(seg_ids[order], small_ids), 0, n - 1)
                hit = seg_ids[order][pos] == small_ids
                cur[hit] = order[pos[hit]]
            cur = cur.astype(np.int16 if n < 32767 else np.int32)
        flat = cur.ravel()
        shifted = flat.astype(np.int64) + 1
        area = np.bincount(shifted, minlength=n + 1)[1:].astype(np.float64)
        cls = meta[:, 1]
        boxes = np.concatenate([meta[:, 2:4], meta[:, 2:4] + meta[:, 4:6] - 1], axis=1).astype(np.float64)
        # centres from the sample (mask centroid; the box centre for segments too small to be sampled)
        gx, gy = self._grid(cur.shape, stride)
        cx = np.bincount(shifted, weights=gx, minlength=n + 1)[1:]
        cy = np.bincount(shifted, weights=gy, minlength=n + 1)[1:]
        centers = np.where(area[:, None] > 0, np.stack([cx, cy], 1) / np.maximum(area, 1)[:, None],
                           (boxes[:, :2] + boxes[:, 2:]) / 2.0) if n else np.zeros((0, 2))
        cent3 = centroids[thing] if centroids is not None else None

        match: dict[int, _Track] = {}  # segment index -> track
        # Stage 1: against the previous frame's tracks, all overlaps from one bincount.
        prev = self._prev
        if n and prev and self._prev_small is not None and self._prev_small.shape == cur.shape:
            m = len(prev)
            pairs = (self._prev_small.ravel().astype(np.int64) + 1) * (n + 1) + shifted
            inter = np.bincount(pairs, minlength=(m + 1) * (n + 1)).reshape(m + 1, n + 1)
            prev_area = inter[1:].sum(axis=1).astype(np.float64)
            inter = inter[1:, 1:].astype(np.float64)
            iou = inter / np.maximum(prev_area[:, None] + area[None, :] - inter, 1e-9)
            tiny = (prev_area[:, None] == 0) | (area[None, :] == 0)  # not in the sample: boxes instead
            if tiny.any():
                pboxes = np.array([t.bbox if t is not None else (0, 0, -1, -1) for t in prev], np.float64)
                iou = np.where(tiny, _box_iou(pboxes, boxes), iou)
            self._gate(iou, prev, cls, cent3, stamp_ns)
            # Confirmed tracks first (the matching cascade of DeepSORT, Wojke et al. 2017): when an object split
            # in two for a frame is whole again, it stays the old track, not the half that was new.
            confirmed = np.array([t is not None and t.hits > 1 for t in prev])
            score = np.where(iou >= self.config.min_iou, iou + confirmed[:, None], 0.0)
            for r, c in _assign(score, self.config.min_iou):
                match[c] = prev[r]  # type: ignore[assignment]
        # Stage 2: what is left against the tracks not matched, their last mask moved by their velocity.
        left = [j for j in range(n) if j not in match]
        used = {id(t) for t in match.values()}
        lost = [t for t in self._tracks if id(t) not in used]
        if left and lost:
            iou = np.zeros((len(lost), len(left)))
            left_arr = np.array(left)
            for r, t in enumerate(lost):
                if not (cls[left_arr] == t.class_id).any():
                    continue
                iou[r] = self._predicted_iou(t, flat, cur.shape, stride, area, left_arr, boxes, stamp_ns)
            self._gate(iou, lost, cls[left_arr], cent3[left_arr] if cent3 is not None else None, stamp_ns)
            for r, c in _assign(iou, self.config.min_iou):
                match[left[c]] = lost[r]
        # Stage 3: objects coming back into view. A track lost at an image edge is matched by a segment of its
        # class that touches the same edge, by the overlap of their extents along that edge (its prediction
        # is out of view, so no mask can overlap).
        left = [j for j in range(n) if j not in match]
        used = {id(t) for t in match.values()}
        gone = [t for t in self._tracks if id(t) not in used and _edges(t.bbox, w, h)]
        if left and gone:
            score = np.zeros((len(gone), len(left)))
            for r, t in enumerate(gone):
                for c, j in enumerate(left):
                    if cls[j] == t.class_id:
                        score[r, c] = _edge_overlap(t.bbox, tuple(boxes[j]), w, h)
            self._gate(score, gone, cls[np.array(left)], cent3[np.array(left)] if cent3 is not None else None,
                       stamp_ns)
            for r, c in _assign(score, self.config.min_edge_overlap):
                match[left[c]] = gone[r]
                gone[r].velocity = None  # it turned round out of view
        # Update matched tracks, start new ones.
        cur_tracks: list[_Track] = []
        box_list, center_list, cls_list = boxes.tolist(), centers.tolist(), cls.tolist()
        finite3 = np.isfinite(cent3).all(axis=1) if cent3 is not None else None
        for j in range(n):  # plain Python floats: this loop runs for every segment of every frame
            t = match.get(j)
            c3 = cent3[j] if finite3 is not None and finite3[j] else None
            cx_j, cy_j = center_list[j]
            if t is None:
                t = _Track(self._new_id(), cls_list[j], stamp_ns, tuple(box_list[j]), (cx_j, cy_j), centroid=c3)
                self._tracks.append(t)
            else:
                dt = (stamp_ns - t.last_ns) / 1e9
                if dt > 0:
                    vx, vy = (cx_j - t.center[0]) / dt, (cy_j - t.center[1]) / dt
                    t.velocity = (vx, vy) if t.velocity is None else (0.5 * (t.velocity[0] + vx),
                                                                        0.5 * (t.velocity[1] + vy))
                t.last_ns, t.bbox, t.center, t.hits = stamp_ns, tuple(box_list[j]), (cx_j, cy_j), t.hits + 1
                if c3 is not None:
                    t.centroid = c3
            t.small, t.index = cur, j
            cur_tracks.append(t)
            out[thing[j]] = t.id
        self._prev, self._prev_small = cur_tracks, cur
        return out

    def _grid(self, shape: tuple[int, int], stride: int) -> tuple[np.ndarray, np.ndarray]:
        """Full-resolution x and y of every sampled pixel (cached per sample shape)."""
        key = (shape, stride)
        if getattr(self, "_grid_key", None) != key:
            ys, xs = np.mgrid[0: shape[0], 0: shape[1]]
            self._grid_key, self._grid_xy = key, ((xs * stride).ravel().astype(np.float64),
                                                  (ys * stride).ravel().astype(np.float64))
        return self._grid_xy

    def _gate(self, iou: np.ndarray, tracks: list, cls: np.ndarray, cent3: Optional[np.ndarray], stamp_ns: int) -> None:
        """Zero the pairs of different classes, and (with centroids) of 3D positions too far apart."""
        if iou.size == 0:
            return
        tcls = np.array([t.class_id if t is not None else -1 for t in tracks])
        iou[tcls[:, None] != cls[None, :]] = 0.0
        if cent3 is None:
            return
        rows = [r for r, t in enumerate(tracks) if t is not None and t.centroid is not None]
        if not rows:
            return
        known = np.stack([tracks[r].centroid for r in rows])
        dt = np.maximum((stamp_ns - np.array([tracks[r].last_ns for r in rows], np.float64)) / 1e9, 0.0)
        reach = self.config.max_speed_mps * dt + self.config.centroid_slack_m
        dist = np.linalg.norm(cent3[None, :, :] - known[:, None, :], axis=2)  # (rows, segments), NaN unknown
        with np.errstate(invalid="ignore"):
            far = dist > reach[:, None]  # NaN compares False: an unknown centroid gates nothing
        iou[rows] = np.where(far, 0.0, iou[rows])

    def _predicted_iou(self, t: _Track, flat: np.ndarray, shape: tuple[int, int], stride: int, area: np.ndarray,
                       cols: np.ndarray, boxes: np.ndarray, stamp_ns: int) -> np.ndarray:
        """IoU of track ``t``'s last mask, moved by its velocity to ``stamp_ns``, with segments ``cols``."""
        dt = max((stamp_ns - t.last_ns) / 1e9, 0.0)
        shift = (t.velocity[0] * dt, t.velocity[1] * dt) if t.velocity is not None else (0.0, 0.0)
        x0, y0, x1, y1 = t.bbox
        pbox = np.array([[x0 + shift[0], y0 + shift[1], x1 + shift[0], y1 + shift[1]]])
        box_iou = _box_iou(pbox, boxes[cols])[0]
        if t.small is None or t.small.shape != shape:
            return box_iou
        own = np.flatnonzero(t.small.ravel() == t.index)
        if own.size == 0:
            return box_iou
        hs, ws = shape
        r = own // ws + int(round(shift[1] / stride))
        c = own % ws + int(round(shift[0] / stride))
        inside = (r >= 0) & (r < hs) & (c >= 0) & (c < ws)
        if not inside.any():
            return np.zeros(cols.size)
        hits = flat[r[inside] * ws + c[inside]].astype(np.int64)
        inter = np.bincount(hits + 1, minlength=area.size + 1)[1:][cols].astype(np.float64)
        mask_iou = inter / np.maximum(inside.sum() + area[cols] - inter, 1e-9)
        return np.where(area[cols] > 0, mask_iou, box_iou)
