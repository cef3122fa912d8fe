"""One camera's video state: the temporal label filter and the instance tracker, used the same way by the node's
publishing stage and by ``ovseg-segment`` on a video (one owner of the per-frame order):

    labels, confidence = filter(labels)  ->  panoptic from the filtered labels  ->  track ids of its segments

Resets (counted for ``/diagnostics``): a new context (vocabulary revision / model), a stamp going back, a new
image size (the tracker's own checks), and :meth:`VideoState.reset` (deactivate, parameters).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from typing import Any, Callable, Hashable, Optional

import numpy as np

from .segmenter import PanopticResult, SegmentationResult
from .temporal import FilterConfig, LabelFilter
from .depth import DepthError
from .tracking import DepthCue, InstanceTracker, TrackerConfig, depth_centroids


class VideoState:
    """Filter + tracker of one camera. ``configure`` each frame with the current options (cheap when unchanged)."""

    def __init__(self) -> None:
        self.tracker = InstanceTracker()
        self.filter = LabelFilter()
        self.tracking = True
        self._lock = threading.Lock()  # diagnostics read from another thread
        self._ms: dict[str, deque] = {"tracking": deque(maxlen=100), "temporal_filter": deque(maxlen=100),
                                      "track_depth_cue": deque(maxlen=100)}
        self.depth_cue_frames = 0  # frames tracked with the 3D centroid cue
        self.depth_cue_refused = 0  # a depth image was there but could not be the frame's (aspect, intrinsics)
        self.depth_cue_last_refusal = ""

    def configure(self, tracking: bool, max_age_s: float, filter_config: FilterConfig) -> None:
        with self._lock:
            if tracking != self.tracking:
                self.tracker.reset("parameters")
                self.tracking = tracking
            if max_age_s != self.tracker.config.max_age_s:
                self.tracker.config = dataclasses.replace(self.tracker.config, max_age_s=float(max_age_s))
            self.filter.configure(filter_config)

    def reset(self, reason: str) -> None:
        """Forget tracks and filter state (``reason``: one of :data:`~.tracking.RESET_REASONS`)."""
        with self._lock:
            self.tracker.reset(reason)
            self.filter.reset()

    def filter_result(self, result: SegmentationResult, image: np.ndarray, stamp_ns: int,
                      context: Hashable) -> SegmentationResult:
        """``result`` with filtered labels/confidence (the same object when the filter is off)."""
        if self.filter.config.method == "none":
            return result
        t0 = time.perf_counter()
        with self._lock:
            labels, conf = self.filter.apply(result.labels, result.confidence, image, stamp_ns, context)
        self._ms["temporal_filter"].append((time.perf_counter() - t0) * 1e3)
        return dataclasses.replace(result, labels=labels, confidence=conf)

    def track(self, panoptic: PanopticResult, stamp_ns: int, context: Hashable,
              centroids: Optional[np.ndarray] = None,
              depth: Optional[Callable[[], Optional[DepthCue]]] = None) -> Optional[np.ndarray]:
        """Track id per segment (uint32, 0 = untracked), or None while tracking is off.

        ``depth``: called (only while tracking) for the frame's depth image; when it gives one, the segments'
        3D centroids gate the association (:func:`~.tracking.depth_centroids`), else masks alone are used.
        The cue's cost (the call and the centroids) is timed as ``track_depth_cue_ms_mean``.
        """
        if not self.tracking:
            return None
        if depth is not None and centroids is None:
            centroids = self._depth_centroids(panoptic, depth)
        t0 = time.perf_counter()
        with self._lock:
            ids = self.tracker.update(panoptic, stamp_ns, context, centroids)
        self._ms["tracking"].append((time.perf_counter() - t0) * 1e3)
        return ids

    def _depth_centroids(self, panoptic: PanopticResult,
                         depth: Callable[[], Optional[DepthCue]]) -> Optional[np.ndarray]:
        t0 = time.perf_counter()
        cue = depth()
        if cue is None:
            return None
        try:
            centroids = depth_centroids(panoptic, cue)
        except DepthError as exc:  # not this frame's depth: masks alone, counted with the reason
            with self._lock:
                self.depth_cue_refused += 1
                self.depth_cue_last_refusal = str(exc)
            return None
        with self._lock:
            self.depth_cue_frames += 1
        self._ms["track_depth_cue"].append((time.perf_counter() - t0) * 1e3)
        return centroids

    def diagnostics(self) -> dict[str, str]:
        """Counters for ``/diagnostics`` (tracks, resets per reason, stage times)."""
        with self._lock:
            stats = self.tracker.stats
            kv: dict[str, Any] = {
                "tracking": "on" if self.tracking else "off",
                "tracks_alive": self.tracker.num_tracks,
                "tracks_created": stats.created,
                "track_frames": stats.frames,
                "track_depth_cue_frames": self.depth_cue_frames,
                "track_depth_cue_refused": self.depth_cue_refused,
                "track_depth_cue_last_refusal": self.depth_cue_last_refusal,
                **{f"track_resets_{k}": v for k, v in stats.resets.items()},
                "last_track_reset": stats.last_reset,
                "temporal_filter": self.filter.config.method,
                "temporal_filter_resets": self.filter.resets,
            }
            for name, values in self._ms.items():
                kv[f"{name}_ms_mean"] = f"{float(np.mean(values)):.2f}" if values else ""
        return {k: str(v) for k, v in kv.items()}
