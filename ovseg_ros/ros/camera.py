"""One camera of segment_node: its subscriptions, conversion, latest-frame mailbox, publishers and counters.

Topic names are relative. The default camera (name "") subscribes ``image`` (and ``image/compressed``) and
publishes under ``~/``; a named camera ``front`` subscribes ``front/image`` and publishes under ``~/front/``,
so one node serves several cameras with one model (``cameras`` parameter) and each camera keeps its own
QoS, drop counters and diagnostics.

Callbacks here only convert and hand the frame to the mailbox: they never wait for the model.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from sensor_msgs.msg import CompressedImage, Image

from ..core.video import VideoState
from . import messages
from .conversions import ConversionError, compressed_to_rgb, image_msg_to_rgb, image_msg_to_rgb_bridge
from .diagnostics import CameraStats
from .guard import LOG_THROTTLE_S, ErrorLog, guarded, reason, sanitize
from .mailbox import Frame, LatestFrameMailbox
from .points import PointsOptions, SemanticPointsOutput
from .qos import output_qos

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

    def __init__(self, node: Any, spec: CameraSpec, errors: ErrorLog, ready: Any, bridge: Any = None) -> None:
        self.node = node
        self.spec = spec
        self.errors = errors
        self.bridge = bridge
        self.stats = CameraStats()
        self.mailbox = LatestFrameMailbox(ready)
        self.latest: Optional[Frame] = None  # newest good frame, for ~/query
        self.pubs: dict[str, Any] = {}
        self.subs: list[Any] = []
        self.extras: list[Any] = []  # optional per-camera outputs (e.g. the semantic point cloud)
        self.max_pixels: Callable[[], int] = lambda: 4096 * 4096
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
        for name, msg in outputs:
            pub = self.pubs.get(name)
            if pub is not None:
                pub.publish(msg)

    # --- inputs (activate .. deactivate) -------------------------------------------------------------
    def subscribe(self, qos: Any, use_compressed: bool, group: Any, events: Any) -> None:
        self.mailbox.reopen()
        topic = f"{self.spec.input_prefix}image"
        on_image = guarded(self.node, self.errors, f"image callback ({topic})", self._on_image)
        self.subs.append(self.node.create_subscription(
            Image, topic, on_image, qos, callback_group=group, event_callbacks=events))
        if use_compressed:
            on_compressed = guarded(self.node, self.errors, f"compressed callback ({topic})", self._on_compressed)
            self.subs.append(self.node.create_subscription(
                CompressedImage, f"{topic}/compressed", on_compressed, qos, callback_group=group,
                event_callbacks=events))

    def start_points(self, qos: Any, options: PointsOptions, publish_lock: threading.Lock) -> None:
        """Subscribe ``depth/image`` + ``depth/camera_info`` and publish ``semantic/points`` (activate)."""
        p = self.spec.input_prefix
        self.points = SemanticPointsOutput(self.node, f"{p}depth/image", f"{p}depth/camera_info",
                                           f"{self.spec.output_prefix}semantic/points", qos, self.depth_group, options,
                                           publish_lock)
        depth, info, cloud = self.points.topics
        self.node.get_logger().info(f"semantic points: {depth} + {info} -> {cloud}")

    def unsubscribe(self) -> None:
        self.mailbox.close()
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
        return convert_image(msg, self.bridge, self.max_pixels())

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
            image = compressed_to_rgb(msg, self.max_pixels())
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
