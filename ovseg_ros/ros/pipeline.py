"""The per-frame pipeline of segment_node: inference thread -> publishing thread, latest item between stages.

* The **inference** thread waits for frames from every camera's mailbox, reads the current
  :class:`~ovseg_ros.ros.vocabulary_service.Binding` once, and segments every ready frame (one call per frame,
  or one batched call when the segmenter offers ``segment_batch``). Each result goes to its camera's result slot.
* The **publishing** thread turns results into messages (label/confidence encoding, panoptic derivation,
  colour and overlay only when subscribed) and publishes them. It overlaps the inference of the next frame, so
  on a fast device the model, not our Python, sets the frame rate.

Between stages there is one slot per camera: a newer item replaces an unpublished one (counted), never a
queue. A result is published by its camera (:meth:`~ovseg_ros.ros.camera.Camera.publish_item`) through the
node's output gate, only if its binding is still the current one: no output computed with a model or vocabulary
that was replaced is ever published. When idle, the publishing thread lets outputs that wait for another input
time out (a cloud waiting for its depth image), so every output leaves from the publishing stage or from its
input's callback.
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..core.models import select_device
from ..core.segmenter import SegmentationResult
from .camera import Camera
from .guard import LOG_THROTTLE_S, ErrorLog, reason
from .mailbox import Frame, LatestFrameMailbox
from .vocabulary_service import Binding


@dataclass
class Item:
    """One segmented frame on its way to publishing."""

    camera: Camera
    frame: Frame
    result: SegmentationResult
    binding: Binding
    dropped: int  # frames dropped at the input since the previous one of this camera
    inference_ms: float


def segment_frames(binding: Binding, images: list[Any]) -> list[SegmentationResult]:
    """Segment ``images`` with one model call when the segmenter batches, else one call each."""
    batch = getattr(binding.segmenter, "segment_batch", None)
    with binding.model_lock:  # the model's image path is entered by one thread at a time (compile_blocks)
        if batch is not None and len(images) > 1:
            return list(batch(images, binding.state))
        return [binding.segmenter.segment(image, binding.state) for image in images]


def name_native_thread(name: str) -> None:
    """Give the calling thread its name in the OS too (Linux, 15 bytes), so top -H, py-spy and the benchmarks'
    per-thread CPU times (/proc/<pid>/task) tell the pipeline's threads apart; a no-op where unsupported."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:  # noqa: BLE001  (not Linux, or no prctl: names are a convenience)
        pass


class Pipeline:
    """The two threads and the slots between them. ``start`` after subscribing, ``stop`` before destroying."""

    def __init__(
        self,
        node: Any,
        cameras: list[Camera],
        frames_ready: threading.Event,
        current: Callable[[], Optional[Binding]],
        errors: ErrorLog,
    ) -> None:
        self.node, self.cameras, self.errors = node, cameras, errors
        self._frames_ready = frames_ready
        self._results_ready = threading.Event()
        self._current = current
        self._slots = {id(c): LatestFrameMailbox(self._results_ready) for c in cameras}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if self.alive():
            raise RuntimeError("the previous pipeline threads are still running")
        self._stop.clear()
        for slot in self._slots.values():
            slot.reopen()
        self._threads = [
            threading.Thread(target=self._infer_loop, name="ovseg_infer", daemon=True),
            threading.Thread(target=self._publish_loop, name="ovseg_publish", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float) -> bool:
        """Ask both threads to end and wait up to ``timeout`` s; True when they did (an inference may be in flight)."""
        self._stop.set()
        self._frames_ready.set()
        self._results_ready.set()
        for slot in self._slots.values():
            slot.close()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not self.alive()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    # --- stage 1: inference ----------------------------------------------------------------------------
    def _infer_loop(self) -> None:
        name_native_thread("ovseg_infer")
        self._select_device()
        while not self._stop.is_set():
            if not self._frames_ready.wait(0.25):
                continue
            self._frames_ready.clear()
            try:
                self._infer_once()
            except Exception as exc:  # noqa: BLE001  (never let the thread die: count it and go on)
                self._error("inference", exc)

    def _infer_once(self) -> None:
        ready = []
        for cam in self.cameras:
            taken = cam.mailbox.take(timeout=0)
            if taken is not None:
                ready.append((cam, *taken))
        binding = self._current()
        if not ready or binding is None or self._stop.is_set():
            return
        select_device(binding.segmenter.device)  # free when unchanged
        t0 = time.perf_counter()
        try:
            results = segment_frames(binding, [frame.image for _, frame, _ in ready])
        except Exception as exc:  # noqa: BLE001
            self._error("segmentation", exc)
            return
        ms = (time.perf_counter() - t0) * 1e3 / len(ready)
        for (cam, frame, dropped), result in zip(ready, results):
            cam.stats.stage("inference", ms)
            if self._slots[id(cam)].put(Item(cam, frame, result, binding, dropped, ms)):
                with cam.stats.lock:
                    cam.stats.dropped_results += 1

    # --- stage 2: post-process and publish ---------------------------------------------------------------
    def _publish_loop(self) -> None:
        name_native_thread("ovseg_publish")
        self._select_device()
        while not self._stop.is_set():
            if not self._results_ready.wait(0.1):
                self._poll()
                continue
            self._results_ready.clear()
            for cam in self.cameras:
                taken = self._slots[id(cam)].take(timeout=0)
                if taken is None or self._stop.is_set():
                    continue
                try:
                    cam.publish_item(taken[0])
                except Exception as exc:  # noqa: BLE001
                    self._error("publishing", exc)
            self._poll()

    def _poll(self) -> None:
        for cam in self.cameras:
            try:
                cam.poll_outputs()
            except Exception as exc:  # noqa: BLE001
                self._error("publishing", exc)

    def _select_device(self) -> None:
        """Each thread's entry: make the model's device current (CUDA's current device is per thread)."""
        binding = self._current()
        try:
            select_device(binding.segmenter.device if binding is not None else None)
        except Exception as exc:  # noqa: BLE001  (counted; the thread keeps serving)
            self._error("device selection", exc)

    def _error(self, where: str, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {reason(exc)}"
        self.errors.record(where, text)
        try:
            self.node.get_logger().error(f"{where} failed: {text}", throttle_duration_sec=LOG_THROTTLE_S)
        except Exception:  # noqa: BLE001  (logging after shutdown)
            pass
