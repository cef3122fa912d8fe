"""One camera of segment_node: its subscriptions, conversion, latest-frame mailbox, publishers and counters.

Topic names are relative. The default camera (name "") subscribes ``image`` (and ``image/compressed``) and
publishes under ``~/``; a named camera ``front`` subscribes ``front/image`` and publishes under ``~/front/``,
so one node serves several cameras with one model (``cameras`` parameter) and each camera keeps its own
QoS, drop counters and diagnostics.

Callbacks here only convert and hand the frame to the mailbox: they never wait for the model.

Publishing one segmented frame (:meth:`Camera.publish_item`, called by the pipeline's publishing thread) builds
the messages outside any lock and publishes them through the node's :class:`~ovseg_ros.ros.gate.OutputGate`:
nothing goes out unless the frame's binding is current and the node active. The camera gets everything it needs
from the node when it is built (:class:`CameraHooks`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from sensor_msgs.msg import CompressedImage, Image

from ..core.video import VideoState
from . import messages
from .conversions import ConversionError, compressed_to_rgb, image_msg_to_rgb, image_msg_to_rgb_bridge
from .diagnostics import CameraStats
from .gate import OutputGate
from .guard import LOG_THROTTLE_S, ErrorLog, guarded, reason, sanitize
from .mailbox import Frame, LatestFrameMailbox
from .outputs import Palette, build_outputs
from .points import PointsOptions, SemanticPointsOutput
from .qos import output_qos


@dataclass(frozen=True)
class OutputOptions:
    """The live parameters of the per-frame outputs (read once per frame)."""

    overlay_alpha: float = 0.5
    publish_panoptic: bool = True
    panoptic_min_area: int = 0
    panoptic_format: str = "int32"


@dataclass(frozen=True)
class CameraHooks:
    """What a camera needs from its node, given when it is built (never patched afterwards)."""

    gate: OutputGate
    errors: ErrorLog
    #: set when any camera's mailbox receives a frame (wakes the inference thread)
    ready: threading.Event
    bridge: Any = None
    max_pixels: Callable[[], int] = lambda: 4096 * 4096
    output_options: Callable[[], OutputOptions] = OutputOptions
    #: latency of a frame in ms against the node's clock (the stamp's clock; see :func:`.clock.latency_ms`)
    latency_ms: Callable[[Frame], float] = lambda frame: (time.monotonic() - frame.received) * 1e3
    palette: Palette = field(default_factory=Palette)
    #: (track_instances, track_max_age, FilterConfig) of the video stage, read every frame (live parameters)
    video_options: Optional[Callable[[], tuple]] = None
    #: a frame's stamp in ns (ROS time), the node's clock for an unset stamp (tracks and label votes)
    stamp_ns: Callable[[Frame], int] = lambda frame: frame.header.stamp.sec * 1_000_000_000 + frame.header.stamp.nanosec

@dataclass(frozen=True)
class CameraSpec:
    """Where one camera's topics live."""

    name: str  # "" for the default camera

    @property
    def input_prefix(self) -> str:
        return f"{self.name}/" if self.name else ""

    @property
    def output_prefix(self) -> str:
        return f"~/{self.name}/" if self.name else "~/"


def camera_specs(names: list[str]) -> list[CameraSpec]:
    """The cameras of the ``cameras`` parameter (empty: one default camera)."""
    return [CameraSpec(n) for n in names] if names else [CameraSpec("")]


class Camera:
    """Subscriptions, mailbox, publishers and counters of one camera."""

    def __init__(self, node: Any, spec: CameraSpec, hooks: CameraHooks) -> None:
        self.node = node
        self.spec = spec
        self.hooks = hooks
        self.gate = hooks.gate
        self.errors = hooks.errors
        self.bridge = hooks.bridge
        self.stats = CameraStats()
        self.mailbox = LatestFrameMailbox(hooks.ready)
        self.latest: Optional[Frame] = None  # newest good frame since activate, for ~/query
        self.pubs: dict[str, Any] = {}
        self.subs: list[Any] = []
        self.extras: list[Any] = []  # optional per-camera outputs (e.g. the semantic point cloud)
        # One group per camera: cameras convert in parallel, each camera's frames in order.
        self.callback_group = MutuallyExclusiveCallbackGroup()
        self.depth_group = MutuallyExclusiveCallbackGroup()
        self.points: Optional[SemanticPointsOutput] = None  # ~/semantic/points (publish_points)
        self.video = VideoState()  # temporal filter + instance tracker (publishing stage)

    # --- outputs (configure .. cleanup) --------------------------------------------------------------
    def create_outputs(self) -> None:
        out, p = output_qos(), self.spec.output_prefix
        pub = self.node.create_publisher
        self.pubs = {
            "labels": pub(Image, f"{p}semantic/labels", out),
            "confidence": pub(Image, f"{p}semantic/confidence", out),
            "color": pub(Image, f"{p}semantic/color", out),
            "overlay": pub(Image, f"{p}overlay", out),
            "panoptic": pub(messages.PanopticSegmentation, f"{p}panoptic", out),
            "info": pub(messages.SegmentationInfo, f"{p}info", out),
        }

    def destroy_outputs(self) -> None:
        for extra in self.extras:
            _quietly(extra.destroy)
        self.extras = []
        for p in self.pubs.values():
            _quietly(lambda p=p: self.node.destroy_publisher(p))
        self.pubs = {}

    def wants(self, name: str) -> bool:
        """True when ``name`` has subscribers (colour and overlay are computed only then)."""
        pub = self.pubs.get(name)
        try:
            return pub is not None and pub.get_subscription_count() > 0
        except Exception:  # noqa: BLE001  (handle being destroyed)
            return False

    def publish(self, outputs: list[tuple[str, Any]]) -> None:
        """Publish built messages (the caller went through the gate)."""
        for name, msg in outputs:
            pub = self.pubs.get(name)
            if pub is not None:
                pub.publish(msg)

    def publish_item(self, item: Any) -> bool:
        """Build and publish one segmented frame (a :class:`~ovseg_ros.ros.pipeline.Item`) through the gate;
        False (counted as stale) when its binding was replaced or the node is inactive."""
        if not self.gate.current(item.binding):
            self._stale()
            return False
        t0 = time.perf_counter()
        latency_ms = self.hooks.latency_ms(item.frame)
        opts = self.hooks.output_options()
        if self.hooks.video_options is not None:
            self.video.configure(*self.hooks.video_options())
        points = self.points
        # the tracker's 3D cue: the frame's depth image if it is already here (never waits for it)
        depth_cue = (lambda: points.depth_cue(item.frame.header)) if points is not None else None
        outputs = build_outputs(item, self.wants, self.hooks.palette, opts.overlay_alpha, opts.publish_panoptic,
                                latency_ms, opts.panoptic_min_area, self.video, self.hooks.stamp_ns(item.frame),
                                panoptic_format=opts.panoptic_format, depth_cue=depth_cue)
        t1 = time.perf_counter()
        ran, _ = self.gate.emit(item.binding, lambda: self.publish(outputs))
        if not ran:  # a vocabulary was swapped in (or the node deactivated) while the messages were built
            self._stale()
            return False
        if points is not None:  # never raises; counts its own refusals; publishes through the gate itself
            labels, _, unlabeled_id = messages.wire_labels(item.result.labels, item.result.vocabulary)
            points.publish(item.frame.header, labels, item.result.confidence, item.frame.image,
                           unlabeled_id=unlabeled_id, binding=item.binding, received=item.frame.received)
        t2 = time.perf_counter()
        with self.stats.lock:
            self.stats.processed += 1
            self.stats.latencies_ms.append(latency_ms)
            self.stats.stage_ms["postprocess"].append((t1 - t0) * 1e3)
            self.stats.stage_ms["publish"].append((t2 - t1) * 1e3)
        return True

    def poll_outputs(self) -> None:
        """Let outputs that wait for another input (a cloud waiting for its depth image) time out; called by the
        publishing stage, so every output leaves from there or from its input's callback, never a timer."""
        points = self.points
        if points is not None:
            points.poll()

    def _stale(self) -> None:
        with self.stats.lock:
            self.stats.stale += 1


    # --- inputs (activate .. deactivate) -------------------------------------------------------------
    def subscribe(self, qos: Any, use_compressed: bool, group: Any, events: Any) -> None:
        self.mailbox.reopen()
        self.latest = None  # a callback that ran during the last deactivate may have left a frame here
        topic = f"{self.spec.input_prefix}image"
        on_image = guarded(self.node, self.errors, f"image callback ({topic})", self._on_image)
        self.subs.append(self.node.create_subscription(
            Image, topic, on_image, qos, callback_group=group, event_callbacks=events))
        if use_compressed:
            on_compressed = guarded(self.node, self.errors, f"compressed callback ({topic})", self._on_compressed)
            self.subs.append(self.node.create_subscription(
                CompressedImage, f"{topic}/compressed", on_compressed, qos, callback_group=group,
                event_callbacks=events))

    def start_points(self, qos: Any, options: PointsOptions) -> None:
        """Subscribe ``depth/image`` + ``depth/camera_info`` and publish ``semantic/points`` (activate)."""
        p = self.spec.input_prefix
        self.points = SemanticPointsOutput(self.node, f"{p}depth/image", f"{p}depth/camera_info",
                                           f"{self.spec.output_prefix}semantic/points", qos, self.depth_group, options,
                                           self.gate)
        depth, info, cloud = self.points.topics
        self.node.get_logger().info(f"semantic points: {depth} + {info} -> {cloud}")

    def unsubscribe(self) -> None:
        self.mailbox.close()
        self.latest = None  # a query while inactive must not answer on a frame from before
        for sub in self.subs:
            _quietly(lambda s=sub: self.node.destroy_subscription(s))
        self.subs = []
        if self.points is not None:
            _quietly(self.points.destroy)
            self.points = None
        self.mailbox.clear()

    @property
    def topics(self) -> list[str]:
        return [s.topic_name for s in self.subs]

    def convert(self, msg: Image) -> np.ndarray:
        return convert_image(msg, self.bridge, self.hooks.max_pixels())

    def _on_image(self, msg: Image) -> None:
        received = time.monotonic()
        try:
            image = self.convert(msg)
        except ConversionError as exc:
            self.refuse(str(exc))
            return
        self._accept(Frame(msg.header, image, received))

    def _on_compressed(self, msg: CompressedImage) -> None:
        received = time.monotonic()
        try:
            image = compressed_to_rgb(msg, self.hooks.max_pixels())
        except ConversionError as exc:
            self.refuse(str(exc))
            return
        self._accept(Frame(msg.header, image, received))

    def _accept(self, frame: Frame) -> None:
        self.stats.stage("convert", (time.monotonic() - frame.received) * 1e3)
        with self.stats.lock:
            self.stats.received += 1
        self.latest = frame
        self.mailbox.put(frame)

    def refuse(self, why: str) -> None:
        why = sanitize(why)  # encodings, frame ids: untrusted text
        self.stats.refuse(why)
        where = f" on camera {self.spec.name}" if self.spec.name else ""
        self.node.get_logger().warning(f"frame refused{where}: {why}", throttle_duration_sec=LOG_THROTTLE_S)


def convert_image(msg: Image, bridge: Any, max_pixels: int) -> np.ndarray:
    """sensor_msgs/Image -> (H, W, 3) uint8 RGB through cv_bridge when present; raises ConversionError only."""
    if bridge is not None:
        return image_msg_to_rgb_bridge(bridge, msg, max_pixels)
    return image_msg_to_rgb(msg, max_pixels)


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  (destroying during shutdown: nothing left to do)
        _ = reason(exc)
