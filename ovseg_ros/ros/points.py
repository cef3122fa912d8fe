"""``~/semantic/points``: the organised semantic point cloud, pixel-aligned with the label image.

:class:`SemanticPointsOutput` is self-contained so that a node (one per camera) can own one: it subscribes
the depth image (registered to the colour camera) and its camera_info, pairs each processed frame with the
depth image nearest in time (:mod:`.sync`), and publishes a ``sensor_msgs/PointCloud2`` with exactly the label
image's width and height and the colour frame's header (Nav2's semantic_segmentation_layer pairs mask,
confidence and cloud by exact stamp and drops a cloud whose ``width * height`` differs from the mask's).

Fields: ``x y z`` float32 (optical frame, NaN where depth is invalid or outside ``[min_depth, max_depth]``),
``confidence`` float32 [0, 1], ``label`` uint16 (the label image's value, its unlabeled id where unlabeled),
``rgb`` packed float32 (camera colour, optional). Geometry: :mod:`ovseg_ros.core.depth`.

Every cloud, from every path (the frame's own publish, a late depth image in the depth callback, a pending
frame resolved by :meth:`SemanticPointsOutput.poll` from the publishing stage), goes out through the node's
:class:`~ovseg_ros.ros.gate.OutputGate`: only while the frame's binding is current and the node active. The cloud
is built outside the gate's lock; only the publish call is inside. :meth:`~SemanticPointsOutput.diagnostics`
only reads counters.

Bad input never escapes as an exception: a refused depth image or camera_info is counted with its reason
(``diagnostics()``), logged throttled, and the node keeps serving.
"""

from __future__ import annotations

import array
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField

from ..core import depth as dp
from ..core.tracking import DepthCue
from .gate import OutputGate
from .guard import sanitize
from .qos import output_qos
from .sync import DEFAULT_MAX_BYTES, ApproximateTimeMatcher

LOG_THROTTLE_S = 5.0


@dataclass(frozen=True)
class PointsOptions:
    """Options of the semantic cloud (node parameters ``min_depth``, ``max_depth``, ``points_rgb``, ``depth_slop``)."""

    min_depth: float = 0.1
    max_depth: float = 10.0
    rgb: bool = False
    slop: float = 0.05
    max_pixels: int = 4096 * 4096
    depth_capacity: int = 256
    #: bound of the buffered depth images in bytes (the image bound alone allowed ~2 GiB of large images)
    depth_bytes: int = DEFAULT_MAX_BYTES
    max_wait: float = 0.5

    def __post_init__(self) -> None:
        if not (0.0 <= self.min_depth < self.max_depth):
            raise ValueError(f"need 0 <= min_depth < max_depth, got {self.min_depth} and {self.max_depth}")
        if not 0.0 <= self.slop <= 10.0:
            raise ValueError(f"depth_slop must be in [0, 10] s, got {self.slop}")


@dataclass(frozen=True, eq=False)  # compared by identity (holds arrays)
class _Frame:
    header: Any
    labels: np.ndarray
    confidence: np.ndarray
    rgb: Optional[np.ndarray]
    unlabeled_id: int
    #: what the frame was computed with: its cloud goes out only while this is the gate's current binding
    binding: Any


class _Depth:
    """A buffered depth image, decoded to metres at most once: the tracker's depth cue and the frame's cloud
    both read it (decoding twice cost ~0.9 ms a frame at VGA). Read-only once decoded; lives as long as the
    matcher buffers it."""

    __slots__ = ("msg", "arrival", "_metres", "_lock")

    def __init__(self, msg: Image, arrival: float) -> None:
        self.msg, self.arrival = msg, arrival
        self._metres: Optional[np.ndarray] = None
        self._lock = threading.Lock()

    def metres(self, max_pixels: Optional[int]) -> np.ndarray:
        """(H, W) float32 metres (NaN invalid); raises DepthError for an unusable image (every time)."""
        with self._lock:
            if self._metres is None:
                self._metres = dp.depth_msg_to_metres(self.msg, max_pixels)
                self._metres.setflags(write=False)  # shared by the cue and the cloud
            return self._metres


@dataclass(frozen=True)
class _CameraModel:
    intrinsics: dp.Intrinsics
    source: str  # "K" or "P"
    frame_id: str


def stamp_ns(header: Any) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def camera_model(msg: CameraInfo) -> _CameraModel:
    """The projection of a depth camera_info; raises DepthError for an unusable one."""
    intr = dp.intrinsics_from_camera_info(msg.k, msg.p, msg.width, msg.height, msg.d)
    return _CameraModel(intr, dp.intrinsics_source(msg.p, msg.d), msg.header.frame_id)


class CloudBuilder:
    """Builds the semantic ``PointCloud2`` of one frame; shared by the node and ``ovseg-bag`` (one implementation).

    The message buffer is reused frame to frame: a message is valid until the next ``build`` (the node
    publishes it, ovseg-bag serializes it, before building the next one).
    """

    def __init__(self, options: PointsOptions, warn: Callable[[str], None] = lambda text: None) -> None:
        self._opts = options
        self._warn = warn
        self._frame_warned = False
        self._data = array.array("B")
        self._data_f32: Optional[np.ndarray] = None

    def build(self, header: Any, labels: np.ndarray, confidence: np.ndarray, rgb: Optional[np.ndarray],
              unlabeled_id: int, depth_msg: Image, camera: Optional[_CameraModel], info_topic: str,
              metres: Optional[np.ndarray] = None) -> PointCloud2:
        """The cloud of a frame (``rgb`` None: no colour field); raises DepthError for unusable inputs.
        ``metres``: ``depth_msg`` already decoded (:func:`.depth.depth_msg_to_metres`), else decoded here."""
        if camera is None:
            raise dp.DepthError(f"no valid camera_info received on {info_topic}: cannot project depth")
        h, w = labels.shape
        if confidence.shape != (h, w):
            raise dp.DepthError(f"confidence {confidence.shape} and labels {(h, w)} differ")
        dh, dw = int(depth_msg.height), int(depth_msg.width)
        dp.check_aspect((dh, dw), (h, w), f"depth {depth_msg.encoding}")
        intr = camera.intrinsics
        dp.check_aspect((intr.height, intr.width), (h, w), "camera_info")
        if depth_msg.header.frame_id != header.frame_id and not self._frame_warned:
            self._frame_warned = True
            self._warn(
                f"depth frame {depth_msg.header.frame_id!r} differs from the colour frame "
                f"{header.frame_id!r}: the cloud uses the colour frame; the depth must be registered to it")
        if metres is None:
            metres = dp.depth_msg_to_metres(depth_msg, self._opts.max_pixels)
        metres = dp.resample_nearest(metres, h, w)
        if rgb is not None and rgb.shape[:2] != (h, w):
            rgb = dp.resample_nearest(rgb, h, w)
        layout = dp.cloud_layout(rgb is not None)
        size = h * w * layout.point_step
        if len(self._data) != size:
            self._data_f32 = None  # release the exported view before resizing
            self._data = array.array("B", bytes(size))
            self._data_f32 = np.frombuffer(self._data, dtype=np.float32)
        dp.semantic_cloud(metres, intr.scaled(w, h), self._opts.min_depth, self._opts.max_depth, labels,
                          confidence.astype(np.float32, copy=False), unlabeled_id, rgb, out=self._data_f32)
        msg = PointCloud2()
        msg.header = header
        msg.height, msg.width = h, w
        msg.fields = [PointField(name=n, offset=o, datatype=t, count=c) for n, o, t, c in layout.fields]
        msg.is_bigendian = dp.is_bigendian()
        msg.point_step = layout.point_step
        msg.row_step = layout.point_step * w
        msg.is_dense = False
        msg.data = self._data  # by reference: the setter keeps an array('B') as is
        return msg


class SemanticPointsOutput:
    """Depth + camera_info subscriptions, the time matcher and the ``PointCloud2`` publisher of one camera."""

    def __init__(
        self,
        node: Any,
        depth_topic: str = "depth/image",
        camera_info_topic: str = "depth/camera_info",
        points_topic: str = "~/semantic/points",
        qos: Any = None,
        callback_group: Any = None,
        options: Optional[PointsOptions] = None,
        gate: Optional[OutputGate] = None,
    ) -> None:
        """``gate``: the node's output gate; every cloud is published through it. Without one (a standalone
        output) a private gate is used that is always open with the binding ``None``."""
        from .qos import input_qos

        self._node = node
        self._opts = options or PointsOptions()
        self._log = node.get_logger()
        self._lock = threading.Lock()
        if gate is None:
            gate = OutputGate()
            gate.install(None, None, lambda binding, stamp: None)
            gate.open()
        self._gate = gate
        self._closed = False
        self._camera: Optional[_CameraModel] = None
        self._matcher: ApproximateTimeMatcher[_Frame, _Depth] = ApproximateTimeMatcher(
            int(self._opts.slop * 1e9), self._opts.depth_capacity, max_wait_s=self._opts.max_wait,
            max_bytes=self._opts.depth_bytes)
        self._published = 0
        self._refused = 0
        self._info_refused = 0
        self._errors = 0
        self._stale = 0  # clouds refused by the gate: their vocabulary/model was replaced, or the node inactive
        self._last_refusal = ""
        self._last_error = ""
        self._health_mark = (0, 0, 0)  # (matched, unmatched, published) at the last health() call
        self._ms: deque = deque(maxlen=100)
        # The builder reuses its message buffer frame to frame (publish copies it into the middleware
        # synchronously); the emit lock serialises building + publishing (frames are emitted from the publishing
        # thread and from the depth callback).
        self._emit_lock = threading.Lock()
        self._builder = CloudBuilder(self._opts, lambda text: self._log.warning(text))
        qos = qos if qos is not None else input_qos()
        self._depth_topic, self._info_topic = depth_topic, camera_info_topic
        self._pub = node.create_publisher(PointCloud2, points_topic, output_qos())
        self._subs = [
            node.create_subscription(Image, depth_topic, self._on_depth, qos, callback_group=callback_group),
            node.create_subscription(CameraInfo, camera_info_topic, self._on_camera_info, qos,
                                     callback_group=callback_group),
        ]
        self._depth_topic, self._info_topic = self._subs[0].topic_name, self._subs[1].topic_name
        self._points_topic = self._pub.topic_name

    # --- topics (for logs) ------------------------------------------------------------------------------
    @property
    def topics(self) -> tuple[str, str, str]:
        """(depth, camera_info, points) resolved topic names."""
        return self._depth_topic, self._info_topic, self._points_topic

    # --- callbacks ---------------------------------------------------------------------------------------
    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            camera = camera_model(msg)
            with self._lock:
                self._camera = camera
        except dp.DepthError as exc:
            self._refuse(f"camera_info refused: {exc}", info=True)
        except Exception as exc:  # noqa: BLE001  (a malformed message must not take the node down)
            self._error(f"camera_info: {type(exc).__name__}: {exc}")

    def _on_depth(self, msg: Image) -> None:
        try:
            dp.check_depth_msg(msg, self._opts.max_pixels)
        except dp.DepthError as exc:
            self._refuse(str(exc))
            return
        except Exception as exc:  # noqa: BLE001
            self._error(f"depth: {type(exc).__name__}: {exc}")
            return
        try:
            now = time.monotonic()
            resolved = self._matcher.push_depth(stamp_ns(msg.header), _Depth(msg, now), now, nbytes=len(msg.data))
            if not resolved:
                return
            # Frames that waited for this depth image: through the gate like every other output (a cloud of
            # a replaced vocabulary would follow a newer LabelInfo).
            self._emit_all(resolved)
        except Exception as exc:  # noqa: BLE001
            self._error(f"depth: {type(exc).__name__}: {exc}")

    # --- the node's side -------------------------------------------------------------------------------
    def publish(
        self,
        header: Any,
        labels: np.ndarray,
        confidence: np.ndarray,
        rgb: Optional[np.ndarray] = None,
        unlabeled_id: int = 65535,
        binding: Any = None,
        received: Optional[float] = None,
    ) -> bool:
        """Queue one processed frame: (H, W) int32 labels (-1 unlabeled), (H, W) float32 confidence, the
        camera's (H, W, 3) uint8 RGB when the ``rgb`` field is on (else ignored), and the ``binding`` it was
        computed with (its cloud, now or when its depth image comes, goes out only while that is current);
        ``received``: the monotonic time the colour image arrived (estimates a clock offset between the streams).

        Returns True when the frame's cloud was published, or waits (at most ``max_wait`` s) for a depth image
        that may still arrive; False when it was refused or no depth image matched (counted). Never raises.
        """
        try:
            if self._closed:
                return False
            frame = _Frame(header, labels, confidence, rgb if self._opts.rgb else None, int(unlabeled_id), binding)
            resolved = self._matcher.push_frame(stamp_ns(header), frame, time.monotonic(), received)
            results = self._emit_all(resolved)
            for (done, _), ok in zip(resolved, results):
                if done is frame:
                    return ok
            return True  # pending: a depth image at or after its stamp may still arrive
        except Exception as exc:  # noqa: BLE001
            self._error(f"publish: {type(exc).__name__}: {exc}")
            return False

    def depth_cue(self, header: Any) -> Optional[DepthCue]:
        """The frame's depth image for the tracker's 3D gate, if it is already buffered (nearest stamp within
        ``depth_slop``) and a camera_info was received; None otherwise (the tracker then uses masks alone).
        Does not wait, take or count: the frame's cloud is matched as before. Never raises."""
        try:
            if self._closed:
                return None
            with self._lock:
                camera = self._camera
            if camera is None:
                return None
            found = self._matcher.peek(stamp_ns(header))
            if found is None:
                return None
            return DepthCue(found.metres(self._opts.max_pixels), camera.intrinsics, self._opts.min_depth, self._opts.max_depth)
        except dp.DepthError:
            return None  # the same image is refused, counted and logged when its cloud is built
        except Exception as exc:  # noqa: BLE001
            self._error(f"depth cue: {type(exc).__name__}: {exc}")
            return None

    def poll(self) -> None:
        """Resolve frames whose wait for a depth image has expired (the publishing stage calls this when idle,
        so a frame's cloud does not wait for the next frame). Never raises."""
        try:
            self._emit_all(self._matcher.poll(time.monotonic()))
        except Exception as exc:  # noqa: BLE001
            self._error(f"poll: {type(exc).__name__}: {exc}")

    def _emit_all(self, resolved: list[tuple[_Frame, Optional[_Depth]]]) -> list[bool]:
        return [self._emit(frame, depth) for frame, depth in resolved]

    def _emit(self, frame: _Frame, depth: Optional[_Depth]) -> bool:
        if not self._gate.current(frame.binding):
            with self._lock:
                self._stale += 1  # not even built: its vocabulary/model was replaced or the node is inactive
            return False
        if depth is None:
            self._log.warning(
                f"no cloud for the frame stamped {frame.header.stamp.sec}.{frame.header.stamp.nanosec:09d}: "
                f"{self._matcher.stats().last_unmatched_cause} on {self._depth_topic}",
                throttle_duration_sec=LOG_THROTTLE_S)
            return False
        with self._emit_lock:
            try:
                t0 = time.perf_counter()
                msg = self._cloud(frame, depth)
            except dp.DepthError as exc:
                self._refuse(str(exc))
                return False
            except Exception as exc:  # noqa: BLE001
                self._error(f"cloud: {type(exc).__name__}: {exc}")
                return False
            ran, sent = self._gate.emit(frame.binding, lambda: self._publish(msg))
            if not ran:
                with self._lock:
                    self._stale += 1
                return False
            if sent:
                with self._lock:
                    self._published += 1
                    self._ms.append((time.perf_counter() - t0) * 1e3)
            return bool(sent)

    def _publish(self, msg: PointCloud2) -> bool:
        """Under the gate's lock. False once destroyed (the publisher may be gone)."""
        with self._lock:
            if self._closed:
                return False
        self._pub.publish(msg)
        return True

    def _cloud(self, frame: _Frame, depth: _Depth) -> PointCloud2:
        with self._lock:
            camera = self._camera
        metres = depth.metres(self._opts.max_pixels) if camera is not None else None  # build names what's missing
        return self._builder.build(frame.header, frame.labels, frame.confidence, frame.rgb, frame.unlabeled_id,
                                   depth.msg, camera, self._info_topic, metres=metres)

    # --- bookkeeping -----------------------------------------------------------------------------------
    def _refuse(self, reason: str, info: bool = False) -> None:
        reason = sanitize(reason)  # encodings, frame ids: untrusted text
        with self._lock:
            if info:
                self._info_refused += 1
            else:
                self._refused += 1
            self._last_refusal = reason
        self._log.warning(f"semantic points: {reason}", throttle_duration_sec=LOG_THROTTLE_S)

    def _error(self, reason: str) -> None:
        reason = sanitize(reason)
        with self._lock:
            self._errors += 1
            self._last_error = reason
        self._log.error(f"semantic points: {reason}", throttle_duration_sec=LOG_THROTTLE_S)

    def diagnostics(self) -> dict[str, str]:
        """Counters for /diagnostics (string values); only reads."""
        st = self._matcher.stats()
        with self._lock:
            camera = self._camera
            ms = list(self._ms)
            out = {
                "points_published": str(self._published),
                "points_matched": str(st.matched),
                "points_unmatched": str(st.unmatched),
                "depth_received": str(st.depth_received),
                "depth_unused": str(st.depth_unused),
                "depth_refused": str(self._refused),
                "camera_info_refused": str(self._info_refused),
                "depth_last_refusal": self._last_refusal,
                "points_errors": str(self._errors),
                "points_stale_vocabulary": str(self._stale),
                "points_last_error": self._last_error,
                "depth_buffered": str(st.buffered),
                "depth_buffered_mb": f"{st.buffered_bytes / 2**20:.3f}",
                "depth_evicted_by_bound": str(st.depth_evicted),
                "depth_stamp_offset_s": f"{st.depth_offset_s:+.3f}" if st.depth_offset_s is not None else "",
                "stamps_backwards_depth": str(st.depth_rewinds),
                "stamps_backwards_colour": str(st.frame_rewinds),
                "points_last_unmatched_cause": st.last_unmatched_cause,
            }
        out["camera_info"] = (f"{camera.intrinsics.width}x{camera.intrinsics.height} ({camera.source})"
                              if camera is not None else "missing")
        out["points_ms_mean"] = f"{np.mean(ms):.2f}" if ms else ""
        return out

    def health(self) -> Optional[str]:
        """Why the frames resolved since the previous call produced no cloud at all (None when some did, or when
        no frame came): for the node's diagnostics level."""
        st = self._matcher.stats()
        with self._lock:
            now = (st.matched, st.unmatched, self._published)
            before, self._health_mark = self._health_mark, now
            last = self._last_refusal or self._last_error
        if now[:2] == before[:2] or now[2] > before[2]:
            return None
        if now[1] > before[1]:
            return (f"no semantic points: {st.last_unmatched_cause} on {self._depth_topic} "
                    f"({st.depth_received} received)")
        return f"no semantic points: {last}"

    def reset(self) -> None:
        """The ROS clock jumped: forget every buffered depth image and waiting frame (:meth:`.sync.reset`)."""
        self._matcher.reset()

    def destroy(self) -> None:
        """Stop publishing and remove the subscriptions and the publisher (idempotent). Waits for a cloud being
        built or published (the emit lock), so the publisher is never destroyed under a publish."""
        with self._emit_lock, self._lock:
            if self._closed:
                return
            self._closed = True
        self._matcher.clear()
        for sub in self._subs:
            self._node.destroy_subscription(sub)
        self._node.destroy_publisher(self._pub)
        self._subs = []
