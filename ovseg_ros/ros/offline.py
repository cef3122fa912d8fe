"""segment_node's outputs produced offline (``ovseg-bag``), through the node's own code.

Nothing here re-implements an output: the segmenter is configured from the node's parameter table
(:mod:`.params`, same defaults, same validation, same preset and model resolution), frames are converted by
:mod:`.conversions`, the messages are built by :func:`.outputs.build_outputs` / :mod:`.messages` and the cloud by
:class:`.points.CloudBuilder`, all as rclpy messages, and serialized with ``rclpy.serialization`` - so a message
in a bag is byte for byte the one the node publishes for the same frame (tests/ros/test_bag_tool.py).

Tracking (``track_instances``, on by default) is the node's tracker (:class:`~ovseg_ros.core.video.VideoState`,
one per camera) run as a sequential pass at merge time: the parts hold ``~/panoptic`` with track id 0, and
:meth:`OfflineNode.track_panoptic` renumbers each camera's frames in time order through
:func:`.outputs.panoptic_message` - so a sharded run, a resumed run and a one-process run give the same ids, the
ids of a node fed the same frames. ``temporal_filter`` other than ``none`` is refused (:func:`check_offline`):
the filter changes the labels every output is built from, frame after frame, which a chunked, sharded run cannot
reproduce without segmenting in order.

Differences from a live node, by necessity: no frame is dropped (``dropped_frames`` is 0), and
``latency_ms`` of ``~/info`` is the frame's processing time (inference + message building; there is no live
clock to measure against). The depth pairing is the node's matcher (:mod:`.sync`) fed in recording order
without a wall-clock wait, i.e. the pairing of a node that receives the depth stream in order and on time.
"""

from __future__ import annotations

import math
import os
import struct
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from ..core import depth as dp
from ..core.temporal import FilterConfig
from ..core.video import VideoState
from ..core.vocabulary import VocabularyError
from . import messages
from .conversions import compressed_to_rgb, image_msg_to_rgb, image_msg_to_rgb_bridge, make_cv_bridge
from .outputs import (
    LATCHED_TOPICS,
    OUTPUT_TOPICS,
    Palette,
    build_outputs,
    label_info_message,
    panoptic_message,
    video_context,
    vocabulary_message,
)
from .params import PARAMS, NodeConfig, initial_vocabulary, validate_all
from .points import CloudBuilder, PointsOptions, camera_model, stamp_ns
from .sync import ApproximateTimeMatcher
from .vocabulary_service import Binding, _with_revision

#: Per-frame outputs in the node's publishing order (build_outputs' order, the cloud after them).
FRAME_OUTPUTS = ("labels", "confidence", "color", "overlay", "panoptic", "info")
POINTS_INDEX = len(FRAME_OUTPUTS)  # the cloud's output index (sorted after the frame's other outputs)
#: Depth images buffered and frames waiting for a depth image, per camera (recording order, no wall clock).
DEPTH_CAPACITY = 64
PENDING_CAPACITY = 64


def node_values(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """segment_node's parameter values: the node's defaults with ``overrides``; ValueError with every reason."""
    unknown = sorted(set(overrides) - {p.name for p in PARAMS})
    if unknown:
        raise ValueError(f"unknown segment_node parameters: {', '.join(unknown)}")
    values = {p.name: (list(p.default) if p.type == "list" else p.default) for p in PARAMS}
    values.update(overrides)
    reasons = validate_all(values)
    if reasons:
        raise ValueError("; ".join(reasons))
    return values


def check_offline(cfg: NodeConfig) -> None:
    """ValueError for node parameters ovseg-bag cannot reproduce."""
    if cfg.temporal_filter != "none":
        raise ValueError(f"temporal_filter: {cfg.temporal_filter!r} is not supported by ovseg-bag (the filter changes "
                         "the labels of every output frame after frame, which chunked and sharded runs cannot "
                         "reproduce); use temporal_filter: none (the node's default). Tracking (track_instances) "
                         "is supported")


def configure(cfg: NodeConfig, device: Any) -> Binding:
    """What the node's configure builds: the segmenter, its encoded vocabulary (revision 1) and identity."""
    from ..core.segmenter import build_segmenter

    vocabulary = initial_vocabulary(cfg)
    why = messages.nav2_vocabulary_error(len(vocabulary), cfg.nav2_compatible)
    if why:
        raise VocabularyError(why)
    segmenter = build_segmenter(cfg.segmenter, cfg.resolved_preset(), cfg.segmenter_overrides(), device=device,
                                cache_dir=os.path.expanduser(cfg.cache_dir) if cfg.cache_dir else "",
                                offline=cfg.offline, text_cache_mb=cfg.text_cache_mb)
    state = _with_revision(segmenter.encode_vocabulary(vocabulary), 1)  # a node's first revision
    return Binding(1, segmenter, state, cfg.segmenter, cfg.model_identity(segmenter))


def cdr_stamp_ns(raw: bytes) -> int:
    """The header stamp of a serialized message that starts with a std_msgs/Header (Image, CompressedImage),
    read without deserializing the payload; ValueError for a message too short to hold one."""
    if len(raw) < 12 or raw[0] != 0 or raw[1] not in (0, 1):
        raise ValueError("not a CDR message with a header")
    order = "<" if raw[1] == 1 else ">"
    sec, nanosec = struct.unpack_from(order + "iI", raw, 4)
    return sec * 1_000_000_000 + nanosec


def output_prefix(node_name: str, camera: str) -> str:
    """``/<node>/`` (or ``/<node>/<camera>/``): where the node's ``~/`` outputs resolve."""
    base = "/" + node_name.strip("/")
    return f"{base}/{camera}/" if camera else f"{base}/"


@dataclass(frozen=True)
class CameraTopics:
    """One camera of the recording: its input topics and the node camera name its outputs go under."""

    name: str  # "" = the node's default camera (outputs under ~/)
    image: str
    compressed: bool
    depth: str = ""
    camera_info: str = ""


@dataclass
class _Item:  # what build_outputs reads of a pipeline item
    frame: Any
    result: Any
    binding: Binding
    inference_ms: float
    dropped: int = 0


@dataclass
class _FrameRef:
    header: Any
    image: np.ndarray


@dataclass(frozen=True, eq=False)
class _Pending:
    """A frame in the depth matcher; only the frames this process segments carry their result."""

    index: int
    log_time: int
    stamp: int
    header: Any = None
    labels: Optional[np.ndarray] = None
    confidence: Optional[np.ndarray] = None
    rgb: Optional[np.ndarray] = None
    unlabeled_id: int = 0


class OfflineNode:
    """Builds one frame's outputs as the node would publish them, serialized (CDR bytes).

    ``outputs``: the per-frame outputs wanted (the node computes colour and overlay only while subscribed:
    here they are written only when asked for). ``timings=False`` writes 0 for the measured timings of
    ``~/info``, so runs can be compared byte for byte.
    """

    def __init__(self, cfg: NodeConfig, binding: Binding, node_name: str, cameras: list[CameraTopics],
                 outputs: set[str], timings: bool = True, log: Any = None) -> None:
        check_offline(cfg)
        self.cfg, self.binding, self.node_name = cfg, binding, node_name
        self.cameras = {c.name: c for c in cameras}
        self.outputs = set(outputs) | {"labels", "confidence", "info"}
        if cfg.publish_panoptic:
            self.outputs.add("panoptic")
        self.timings = timings
        self._log = log
        self._palette = Palette()
        self._bridge = make_cv_bridge()
        self._label_info_cls = messages.label_info_type()
        self._points = {c.name: _CameraPoints(c, self._points_options(), log) for c in cameras if c.depth}
        self._video: dict[str, VideoState] = {}  # panoptic topic -> its camera's tracker (track_panoptic)
        for cam in cameras:
            video = VideoState()
            video.configure(cfg.track_instances, cfg.track_max_age, FilterConfig("none"))
            self._video[self.topic(cam.name, "panoptic")] = video

    def _points_options(self) -> PointsOptions:
        c = self.cfg
        return PointsOptions(c.min_depth, c.max_depth, c.points_rgb, c.depth_slop, c.max_image_pixels)

    # --- topics --------------------------------------------------------------------------------------------
    def topic(self, camera: str, output: str) -> str:
        return output_prefix(self.node_name, camera) + OUTPUT_TOPICS[output][0]

    def output_topics(self, with_label_info: bool) -> list[tuple[str, str, bool]]:
        """(topic, message type, latched) of everything this run writes, latched ones first."""
        out = [(output_prefix(self.node_name, "") + LATCHED_TOPICS[n][0], LATCHED_TOPICS[n][1], True)
               for n in ("vocabulary", "label_info") if n == "vocabulary" or with_label_info]
        for cam in self.cameras.values():
            names = [n for n in FRAME_OUTPUTS if n in self.outputs] + (["points"] if cam.depth else [])
            out += [(self.topic(cam.name, n), OUTPUT_TOPICS[n][1], False) for n in names]
        return out

    @property
    def has_label_info(self) -> bool:
        return self._label_info_cls is not None

    def drop_label_info(self) -> None:
        """Write no ``~/label_info`` (vision_msgs importable, but its .msg definitions are not installed)."""
        self._label_info_cls = None

    # --- latched ---------------------------------------------------------------------------------------------
    def latched(self, stamp_ns_: int) -> list[tuple[str, bytes]]:
        """``~/vocabulary`` (and ``~/label_info`` when vision_msgs is installed), stamped ``stamp_ns_``."""
        from builtin_interfaces.msg import Time

        stamp = Time(sec=stamp_ns_ // 1_000_000_000, nanosec=stamp_ns_ % 1_000_000_000)
        b = self.binding
        prefix = output_prefix(self.node_name, "")
        out = [(prefix + "vocabulary", serialize_message(vocabulary_message(b, stamp)))]
        if self._label_info_cls is not None:
            msg = label_info_message(self._label_info_cls, b, stamp)
            out.append((prefix + "label_info", serialize_message(msg)))
        return out

    # --- frames ----------------------------------------------------------------------------------------------
    def decode(self, camera: str, raw: bytes) -> tuple[Any, np.ndarray]:
        """(header, RGB image) of a recorded frame; ConversionError (a frame the node refuses) or ValueError."""
        cam = self.cameras[camera]
        limit = self.cfg.max_image_pixels
        if cam.compressed:
            msg = deserialize_message(raw, CompressedImage)
            return msg.header, compressed_to_rgb(msg, limit)
        msg = deserialize_message(raw, Image)
        if self._bridge is not None:
            return msg.header, image_msg_to_rgb_bridge(self._bridge, msg, limit)
        return msg.header, image_msg_to_rgb(msg, limit)

    def segment(self, image: np.ndarray) -> tuple[Any, float]:
        t0 = time.perf_counter()
        result = self.binding.segmenter.segment(image, self.binding.state)
        return result, (time.perf_counter() - t0) * 1e3

    def frame_outputs(self, camera: str, header: Any, image: np.ndarray, result: Any,
                      inference_ms: float) -> list[tuple[int, str, bytes]]:
        """(output index, topic, CDR) of one segmented frame, in the node's publishing order (the cloud apart)."""
        t0 = time.perf_counter()
        wants = self.outputs.__contains__
        latency = inference_ms if self.timings else 0.0
        item = _Item(_FrameRef(header, image), result, self.binding, inference_ms if self.timings else 0.0)
        # ~/panoptic with its full id image and track id 0: track_panoptic numbers it (and puts the id image in
        # panoptic_format) at the merge
        built = build_outputs(item, wants, self._palette, self.cfg.overlay_alpha, self.cfg.publish_panoptic,
                              latency, self.cfg.panoptic_min_area, panoptic_format="int32")
        if self.timings:  # latency: inference + building these messages (no live clock offline)
            for name, msg in built:
                if name == "info":
                    msg.latency_ms = float(inference_ms + (time.perf_counter() - t0) * 1e3)
        return [(FRAME_OUTPUTS.index(name), self.topic(camera, name), serialize_message(msg)) for name, msg in built]

    def track_panoptic(self, topic: str, raw: bytes, log_time: int) -> bytes:
        """``~/panoptic`` of a part (int32 id image, track ids 0) as the node publishes it: numbered by its
        camera's tracker (when ``track_instances``), its id image in ``panoptic_format``. Call it for each camera's
        frames in time order, once per frame (the tracker's state runs from one to the next). The frame's time is
        its stamp, the log time for an unset stamp (the node takes its clock's)."""
        video = self._video[topic]
        if not video.tracking and self.cfg.panoptic_format == "int32":
            return raw  # already the node's message
        msg = deserialize_message(raw, messages.PanopticSegmentation)
        vocab = self.binding.vocabulary
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec or log_time
        panoptic = messages.panoptic_from_msg(msg, vocab)
        out = panoptic_message(msg.header, vocab, panoptic, video, stamp, video_context(vocab, self.binding),
                               self.cfg.panoptic_format)
        return serialize_message(out)

    def tracked_topics(self) -> set[str]:
        return set(self._video)

    # --- the semantic cloud ------------------------------------------------------------------------------------
    def push_camera_info(self, camera: str, raw: bytes) -> None:
        self._points[camera].camera_info(raw)

    def push_depth(self, camera: str, raw: bytes) -> list[tuple[int, int, str, Optional[bytes]]]:
        return self._points[camera].depth(raw, self.topic(camera, "points"))

    def push_frame(self, camera: str, index: int, log_time: int, stamp: int, header: Any = None,
                   image: Optional[np.ndarray] = None, result: Any = None) -> list[tuple[int, int, str, Optional[bytes]]]:
        """Give a selected frame to the camera's depth matcher; returns the clouds completed now as
        (frame index, log time, topic, CDR). ``result`` None: a frame without a cloud (segmented by another
        process, or refused) - every process gives every frame, so all pair depth images alike."""
        points = self._points.get(camera)
        if points is None:
            return []
        if result is None:
            pending = _Pending(index, log_time, stamp)
        else:
            labels, _, unlabeled = messages.wire_labels(result.labels, result.vocabulary)  # as the node
            pending = _Pending(index, log_time, stamp, header, labels, result.confidence,
                               image if self.cfg.points_rgb else None, unlabeled)
        return points.frame(pending, self.topic(camera, "points"))

    def flush(self) -> list[tuple[int, int, str, Optional[bytes]]]:
        """Clouds of frames still waiting for depth at the end of the recording."""
        return [c for cam, p in self._points.items() for c in p.flush(self.topic(cam, "points"))]

    def points_stats(self) -> dict[str, dict[str, int]]:
        return {cam: p.stats() for cam, p in self._points.items()}


class _CameraPoints:
    """The node's depth matcher + camera model + cloud builder for one camera, fed in recording order."""

    def __init__(self, cam: CameraTopics, options: PointsOptions, log: Any) -> None:
        self.cam, self.opts = cam, options
        warn = (lambda text: log.warning(text)) if log is not None else (lambda text: None)
        self._warn = warn
        self._builder = CloudBuilder(options, warn)
        self._camera: Any = None
        # No wall-clock wait offline: a frame waits until a depth image at or after its stamp (or the end).
        self._matcher: ApproximateTimeMatcher[_Pending, Image] = ApproximateTimeMatcher(
            int(options.slop * 1e9), depth_capacity=DEPTH_CAPACITY, pending_capacity=PENDING_CAPACITY,
            max_wait_s=math.inf)
        self.refused = 0
        self.published = 0

    def camera_info(self, raw: bytes) -> None:
        try:
            self._camera = camera_model(deserialize_message(raw, CameraInfo))
        except dp.DepthError as exc:
            self.refused += 1  # the node keeps its last good camera model too
            self._warn(f"camera_info refused on {self.cam.camera_info}: {exc}")

    def depth(self, raw: bytes, topic: str) -> list[tuple[int, int, str, Optional[bytes]]]:
        msg = deserialize_message(raw, Image)
        try:
            dp.check_depth_msg(msg, self.opts.max_pixels)
        except dp.DepthError as exc:
            self.refused += 1
            self._warn(f"depth refused on {self.cam.depth}: {exc}")
            return []
        return self._emit(self._matcher.push_depth(stamp_ns(msg.header), msg, 0.0), topic)

    def frame(self, pending: _Pending, topic: str) -> list[tuple[int, int, str, Optional[bytes]]]:
        return self._emit(self._matcher.push_frame(pending.stamp, pending, 0.0), topic)

    def flush(self, topic: str) -> list[tuple[int, int, str, Optional[bytes]]]:
        return self._emit(self._matcher.flush(), topic)

    def _emit(self, resolved: list[tuple[_Pending, Optional[Image]]], topic: str) -> list[tuple[int, int, str, Optional[bytes]]]:
        """(frame index, log time, topic, CDR or None) of every resolved frame: None where no cloud is written
        (another process's frame, no depth within depth_slop, or unusable inputs - the node publishes none)."""
        out: list[tuple[int, int, str, Optional[bytes]]] = []
        for frame, depth in resolved:
            data = None
            if frame.labels is not None and depth is not None:
                try:
                    msg = self._builder.build(frame.header, frame.labels, frame.confidence, frame.rgb,
                                              frame.unlabeled_id, depth, self._camera, self.cam.camera_info)
                    data = serialize_message(msg)
                    self.published += 1
                except dp.DepthError as exc:
                    self.refused += 1
                    self._warn(f"no cloud for frame {frame.index}: {exc}")
            out.append((frame.index, frame.log_time, topic, data))
        return out

    def stats(self) -> dict[str, int]:
        st = self._matcher.stats()
        return {"matched": st.matched, "unmatched": st.unmatched, "refused": self.refused,
                "published": self.published}
