"""Counters of segment_node and the ``/diagnostics`` message built from them.

The counters are written by callback, inference and publishing threads and read by the diagnostics timer,
each under one short lock. Diagnostics only read: building the message never blocks a frame.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

#: An error older than this no longer colours the status (it stays listed with its age).
ERROR_RECENT_S = 30.0
STAGES = ("convert", "inference", "postprocess", "publish")


@dataclass
class CameraStats:
    """One camera's counters."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    received: int = 0
    processed: int = 0
    refused: int = 0
    #: results computed for a model or vocabulary that was replaced before publishing (never published)
    stale: int = 0
    #: results replaced in the publish stage by a newer one before they were published
    dropped_results: int = 0
    last_refusal: str = ""
    last_refusal_time: float = 0.0
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=100))
    stage_ms: dict[str, deque] = field(default_factory=lambda: {s: deque(maxlen=100) for s in STAGES})
    tick_time: float = field(default_factory=time.monotonic)
    tick_counts: tuple[int, ...] = (0, 0, 0, 0)

    def refuse(self, reason: str) -> None:
        with self.lock:
            self.refused += 1
            self.last_refusal = reason
            self.last_refusal_time = time.monotonic()

    def stage(self, name: str, ms: float) -> None:
        with self.lock:
            self.stage_ms[name].append(ms)


def _mean(values: Any) -> str:
    return f"{float(np.mean(values)):.1f}" if values else ""


def camera_values(name: str, stats: CameraStats, dropped_total: int) -> tuple[dict[str, str], dict[str, float]]:
    """(key/values for one camera, rates) and advance the rate window."""
    now = time.monotonic()
    with stats.lock:
        counts = (stats.received, stats.processed, dropped_total, stats.refused)
        dt = max(now - stats.tick_time, 1e-6)
        rates = dict(zip(("received", "processed", "dropped", "refused"),
                         ((c - p) / dt for c, p in zip(counts, stats.tick_counts))))
        stats.tick_time, stats.tick_counts = now, counts
        lat = list(stats.latencies_ms)
        stages = {k: list(v) for k, v in stats.stage_ms.items()}
        kv = {
            "camera": name or "(default)",
            "received_fps": f"{rates['received']:.2f}",
            "processed_fps": f"{rates['processed']:.2f}",
            "dropped_fps": f"{rates['dropped']:.2f}",
            "refused_fps": f"{rates['refused']:.2f}",
            "frames_received": str(counts[0]),
            "frames_processed": str(counts[1]),
            "frames_dropped": str(counts[2]),
            "frames_refused": str(counts[3]),
            "results_dropped_in_publish_stage": str(stats.dropped_results),
            "results_stale_vocabulary_or_model": str(stats.stale),
            "last_refusal_reason": stats.last_refusal,
            "last_refusal_age_s": f"{now - stats.last_refusal_time:.1f}" if stats.last_refusal else "",
        }
    kv["latency_ms_mean"] = _mean(lat)
    kv["latency_ms_max"] = f"{max(lat):.1f}" if lat else ""
    kv["latency_ms_p95"] = f"{float(np.percentile(lat, 95)):.1f}" if lat else ""
    for stage, values in stages.items():
        kv[f"{stage}_ms_mean"] = _mean(values)
    return kv, rates


def status_level(configured: bool, active: bool, transition_error: str, rates: dict[str, float],
                 last_refusal: str, error_age: Optional[float], last_error: str) -> tuple[int, str]:
    """(DiagnosticStatus level, message) of one camera or the node."""
    from diagnostic_msgs.msg import DiagnosticStatus as D

    if not configured:
        return (D.ERROR, f"unconfigured: {transition_error}") if transition_error else (D.WARN, "unconfigured")
    if not active:
        return D.WARN, "inactive"
    recent_error = error_age is not None and error_age < ERROR_RECENT_S
    if recent_error and rates.get("processed", 0.0) == 0 and rates.get("received", 0.0) > 0:
        return D.ERROR, f"segmentation failing: {last_error}"
    if rates.get("refused", 0.0) > 0:
        return D.WARN, f"refusing frames: {last_refusal}"
    if recent_error:
        return D.WARN, f"recent error: {last_error}"
    if rates.get("received", 0.0) == 0:
        return D.OK, "active, waiting for images"
    return D.OK, f"active, {rates.get('processed', 0.0):.1f} fps"


def cuda_memory(device: Any) -> dict[str, str]:
    """Allocated / reserved CUDA memory of ``device`` (empty off CUDA)."""
    try:
        import torch

        if device is None or torch.device(device).type != "cuda":
            return {}
        mib = 1024.0 * 1024.0
        return {
            "gpu_memory_allocated_mb": f"{torch.cuda.memory_allocated(device) / mib:.1f}",
            "gpu_memory_reserved_mb": f"{torch.cuda.memory_reserved(device) / mib:.1f}",
        }
    except Exception:  # noqa: BLE001
        return {}


def make_status(name: str, hardware_id: str, level: int, message: str, kv: dict[str, str]) -> Any:
    from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

    status = DiagnosticStatus()
    from .guard import sanitize

    # Values quote input (refusal reasons, frame ids, class names): escaped, as in the logs.
    status.name = sanitize(name)
    status.hardware_id = sanitize(hardware_id)
    status.level = level
    status.message = sanitize(message)
    status.values = [KeyValue(key=k, value=sanitize(v)) for k, v in kv.items()]
    return status


@dataclass(frozen=True)
class NodeView:
    """What the node's status is built from (read by the node's diagnostics timer, passed in one piece)."""

    base: str  # the node's fully qualified name
    binding: Any  # the current binding or None
    configured: bool
    active: bool
    device: Any
    cameras: list[Any]  # ovseg_ros.ros.camera.Camera
    errors: tuple[int, str, Optional[float]]  # ErrorLog.snapshot()
    recovered: int  # executor faults recovered from (counted, never a warning)
    transition_error: str
    extra: dict[str, str] = field(default_factory=dict)  # node-level values of other parts (e.g. the clock)


def node_diagnostics(view: NodeView) -> list[Any]:
    """The whole ``/diagnostics`` status list of the node: one status, or one per camera plus the node's.

    Only reads counters (and advances their rate windows); nothing here publishes an output.
    """
    from diagnostic_msgs.msg import DiagnosticStatus

    binding = view.binding
    n_errors, last_error, error_age = view.errors
    node_kv = {
        "state": "active" if view.active else ("inactive" if view.configured else "unconfigured"),
        "segmenter": binding.segmenter_name if binding else "",
        "model": binding.model_identity if binding else "",
        "model_generation": str(binding.generation if binding else 0),
        "device": str(view.device or ""),
        "vocabulary_revision": str(binding.vocabulary.revision if binding else 0),
        "classes": str(len(binding.vocabulary) if binding else 0),
        "cameras": str(len(view.cameras)),
        "errors": str(n_errors),
        "last_error": last_error,
        "last_error_age_s": f"{error_age:.1f}" if error_age is not None else "",
        "executor_recovered": str(view.recovered),
        **view.extra,
        **cuda_memory(view.device),
    }
    if view.transition_error:
        node_kv["last_transition_error"] = view.transition_error
    statuses = []
    total_rates: dict[str, float] = {}
    hw = str(view.device or "none")
    level, message = 0, ""
    for cam in view.cameras:
        kv, rates = camera_values(cam.spec.name, cam.stats, cam.mailbox.dropped_total)
        for k, v in rates.items():
            total_rates[k] = total_rates.get(k, 0.0) + v
        level, message = status_level(view.configured, view.active, view.transition_error, rates,
                                      kv["last_refusal_reason"], error_age, last_error)
        video = getattr(cam, "video", None)
        if video is not None:
            kv.update(video.diagnostics())
        points = cam.points
        if points is not None:
            kv.update(points.diagnostics())
            problem = points.health()
            if problem and level == DiagnosticStatus.OK:
                level, message = DiagnosticStatus.WARN, problem
        if len(view.cameras) == 1:
            node_kv.update(kv)  # one camera: one status, as before
        else:
            statuses.append(make_status(f"{view.base}: camera {cam.spec.name}", hw, level, message, kv))
    if len(view.cameras) != 1:
        level, message = status_level(view.configured, view.active, view.transition_error, total_rates,
                                      node_kv.get("last_refusal_reason", ""), error_age, last_error)
    statuses.insert(0, make_status(f"{view.base}: segmentation", hw, level, message, node_kv))
    return statuses
