"""``segment_node``: open-vocabulary semantic/panoptic segmentation of a camera stream (lifecycle node).

Lifecycle (docs: style-anchors.md, ROS layer):

* configure - read and validate parameters, build the segmenter (loads the model), encode the initial
  vocabulary, create publishers and services, publish the latched vocabulary. Invalid parameters or a
  missing checkpoint: FAILURE with the reason logged, back to unconfigured.
* activate - model to its device, subscribe ``image`` (and ``image/compressed``), start the worker.
* deactivate - unsubscribe, stop the worker (no more outputs), model to CPU and free CUDA memory.
* cleanup - destroy what configure created. ``autostart`` (default true) self-triggers configure+activate.

Threading: the image callback only converts the message and puts it in a one-slot mailbox (a newer frame
replaces an unprocessed one, counted as dropped); one worker thread runs the model on the newest frame.
Services run in their own reentrant callback group of a multi-threaded executor, so they answer while
inference runs. The vocabulary state is swapped as one reference under a short lock, and the worker reads
it once per frame, so no output mixes two vocabularies.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import QoSProfile
from sensor_msgs.msg import CompressedImage, Image

from ovseg_ros.srv import GetVocabulary, Query, SetVocabulary

from ..core.vocabulary import Vocabulary, VocabularyError, load_vocabulary_file
from . import messages
from .conversions import (
    ConversionError,
    compressed_to_rgb,
    image_msg_to_rgb,
    image_msg_to_rgb_bridge,
    make_cv_bridge,
    numpy_to_image,
)
from .mailbox import Frame, LatestFrameMailbox
from .points import PointsOptions, SemanticPointsOutput
from .params import (
    LIVE,
    ON_ACTIVATE,
    NodeConfig,
    current_values,
    declare_parameters,
    find_vocabulary_preset,
    validate,
    validate_all,
)
from .qos import input_qos, latched_qos, output_qos

SUCCESS = TransitionCallbackReturn.SUCCESS
FAILURE = TransitionCallbackReturn.FAILURE
LOG_THROTTLE_S = 5.0


@dataclass
class _Stats:
    """Counters for diagnostics; guarded by ``lock`` (callback, worker and timer threads update them)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    received: int = 0
    processed: int = 0
    refused: int = 0
    errors: int = 0
    last_refusal: str = ""
    last_error: str = ""
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=100))
    inference_ms: deque = field(default_factory=lambda: deque(maxlen=100))
    # snapshot at the previous diagnostics tick, for rates
    tick_time: float = field(default_factory=time.monotonic)
    tick_counts: tuple[int, int, int, int] = (0, 0, 0, 0)


class SegmentNode(LifecycleNode):
    """The segmentation lifecycle node. See the module docstring."""

    def __init__(self, node_name: str = "segment_node", **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._param_errors = declare_parameters(self)
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._cfg: Optional[NodeConfig] = None
        self._segmenter: Any = None
        self._device: Any = None
        self._vstate: Any = None  # the segmenter's VocabularyState; swapped whole, never mutated
        self._state_lock = threading.Lock()  # held only to swap/read the reference
        self._vocab_change_lock = threading.Lock()  # serialises whole vocabulary changes (encode + swap)
        self._revision = 0  # last revision handed out; grows across configure cycles
        self._vocab_stamp: Any = None
        self._model_identity = ""
        self._palette_cache: tuple[int, Optional[np.ndarray]] = (-1, None)

        self._mailbox = LatestFrameMailbox()
        self._latest: Optional[Frame] = None  # newest good frame, for ~/query
        self._worker: Optional[threading.Thread] = None
        self._stop_event = threading.Event()
        self._publish_lock = threading.Lock()  # makes "deactivated => nothing published" exact
        self._is_active = False
        self._stats = _Stats()

        self._bridge = make_cv_bridge()
        self._label_info_cls = messages.label_info_type()
        self._cb_image = MutuallyExclusiveCallbackGroup()
        self._cb_services = ReentrantCallbackGroup()
        self._cb_timer = MutuallyExclusiveCallbackGroup()
        self._cb_depth = MutuallyExclusiveCallbackGroup()
        self._points: Optional[SemanticPointsOutput] = None  # ~/semantic/points (publish_points)
        self._published_revision = -1  # revision of the vocabulary/LabelInfo last published
        self._pubs: dict[str, Any] = {}
        self._subs: list[Any] = []
        self._srvs: list[Any] = []
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))
        self._diag_period = float(self.get_parameter("diagnostics_period").value)
        self._diag_timer = self.create_timer(self._diag_period, self._publish_diagnostics, self._cb_timer)
        self._last_transition_error = ""
        if self._bridge is None:
            self.get_logger().debug("cv_bridge not importable: using ovseg_ros's own image conversion")

    # --- parameters ----------------------------------------------------------------------------------
    def _on_set_parameters(self, params: list) -> SetParametersResult:
        values = current_values(self)
        values.update({p.name: p.value for p in params})
        for p in params:
            reason = validate(p.name, p.value, values)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        for p in params:
            self._param_errors.pop(p.name, None)  # a bad startup override is fixed by a valid value
        changed = [p.name for p in params if p.name not in LIVE]
        if changed and self._cfg is not None:
            when = "activate" if set(changed) <= ON_ACTIVATE else "configure"
            self.get_logger().info(f"parameters {changed} take effect at the next {when}")
        return SetParametersResult(successful=True)

    @property
    def autostart(self) -> bool:
        return bool(self.get_parameter("autostart").value)

    # --- lifecycle -----------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Build the segmenter and the initial vocabulary; FAILURE (with the reason logged) if impossible."""
        values = current_values(self)
        reasons = list(self._param_errors.values()) + validate_all(values)
        if reasons:
            return self._fail("invalid parameters: " + "; ".join(reasons))
        cfg = NodeConfig.from_values(values)
        from ..core.models import ModelLoadError, resolve_device
        from ..core.segmenter import build_segmenter

        try:
            device = resolve_device(cfg.device)
            vocabulary = self._initial_vocabulary(cfg)
            nav2_reason = messages.nav2_vocabulary_error(len(vocabulary), cfg.nav2_compatible)
            if nav2_reason:
                raise VocabularyError(nav2_reason)
            preset = cfg.resolved_preset()
            self.get_logger().info(f"loading segmenter {cfg.segmenter!r} (preset {preset or '-'!r}) on {device}")
            t0 = time.monotonic()
            segmenter = build_segmenter(
                cfg.segmenter,
                preset,
                cfg.segmenter_overrides(),
                device=device,
                cache_dir=os.path.expanduser(cfg.cache_dir) if cfg.cache_dir else "",
                offline=cfg.offline,
            )
            vocab_state = segmenter.encode_vocabulary(vocabulary.with_revision(self._revision + 1))
        except (ModelLoadError, VocabularyError, ValueError, KeyError, TypeError, RuntimeError, OSError) as exc:
            return self._fail(_reason(exc))
        except Exception as exc:  # noqa: BLE001  (a segmenter bug: say what it was, stay unconfigured)
            self.get_logger().debug(traceback.format_exc())
            return self._fail(f"{type(exc).__name__}: {_reason(exc)}")
        self._cfg, self._segmenter, self._device = cfg, segmenter, device
        self._model_identity = cfg.model_identity(segmenter)
        if self._model_identity.endswith("@random"):
            self.get_logger().warning("the model has RANDOM weights: outputs are meaningless (tests/demo only)")
        self._create_outputs()
        self._set_state(vocab_state)
        if cfg.diagnostics_period != self._diag_period:
            self.destroy_timer(self._diag_timer)
            self._diag_period = cfg.diagnostics_period
            self._diag_timer = self.create_timer(self._diag_period, self._publish_diagnostics, self._cb_timer)
        self.get_logger().info(
            f"configured in {time.monotonic() - t0:.1f} s: {cfg.segmenter} {self._model_identity}, "
            f"{len(vocabulary)} classes"
        )
        self._last_transition_error = ""
        return SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Move the model to its device, subscribe, start the worker."""
        cfg = NodeConfig.from_values(current_values(self))  # ON_ACTIVATE parameters may have changed
        try:
            self._move_model(self._device)
            qos = input_qos(cfg.image_reliability)
            points_opts = PointsOptions(cfg.min_depth, cfg.max_depth, cfg.points_rgb, cfg.depth_slop,
                                        cfg.max_image_pixels) if cfg.publish_points else None
        except (RuntimeError, ValueError) as exc:
            return self._fail(_reason(exc), "activate")
        self._stop_event.clear()
        self._mailbox.reopen()
        events = _qos_advice(self, cfg.image_reliability)
        self._subs.append(self.create_subscription(
            Image, "image", self._on_image, qos, callback_group=self._cb_image, event_callbacks=events))
        if cfg.use_compressed:
            self._subs.append(self.create_subscription(
                CompressedImage, "image/compressed", self._on_compressed, qos, callback_group=self._cb_image,
                event_callbacks=events))
        if points_opts is not None:
            self._points = SemanticPointsOutput(self, "depth/image", "depth/camera_info", "~/semantic/points", qos,
                                                self._cb_depth, points_opts)
        self._worker = threading.Thread(target=self._work, name="ovseg_worker", daemon=True)
        self._worker.start()
        with self._publish_lock:
            self._is_active = True
        topics = ", ".join(s.topic_name for s in self._subs)
        self.get_logger().info(f"active: segmenting {topics} ({cfg.image_reliability})")
        if self._points is not None:
            depth, info, cloud = self._points.topics
            self.get_logger().info(f"semantic points: {depth} + {info} -> {cloud}")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop inputs and outputs, then release GPU memory (the model waits on the CPU)."""
        self._stop_processing()
        self._move_model("cpu")
        self.get_logger().info("inactive: not subscribed, model released to CPU")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Destroy what configure created."""
        self._release_all()
        self.get_logger().info("cleaned up")
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_all()
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error("error during a transition; releasing everything (back to unconfigured)")
        self._release_all()
        return SUCCESS

    def _fail(self, reason: str, transition: str = "configure") -> TransitionCallbackReturn:
        self._last_transition_error = f"{transition} failed: {reason}"
        self.get_logger().error(self._last_transition_error)
        return FAILURE

    def _initial_vocabulary(self, cfg: NodeConfig) -> Vocabulary:
        if cfg.vocabulary:
            return Vocabulary.from_request(list(cfg.vocabulary), source="parameter")
        if cfg.vocabulary_file:
            return load_vocabulary_file(os.path.expanduser(cfg.vocabulary_file))
        path = find_vocabulary_preset(cfg.vocabulary_preset) if cfg.vocabulary_preset else None
        if path is None:
            raise VocabularyError("no vocabulary: set vocabulary, vocabulary_file or vocabulary_preset")
        return load_vocabulary_file(path)

    def _create_outputs(self) -> None:
        out = output_qos()
        pub = self.create_publisher
        self._pubs = {
            "labels": pub(Image, "~/semantic/labels", out),
            "confidence": pub(Image, "~/semantic/confidence", out),
            "color": pub(Image, "~/semantic/color", out),
            "overlay": pub(Image, "~/overlay", out),
            "panoptic": pub(messages.PanopticSegmentation, "~/panoptic", out),
            "info": pub(messages.SegmentationInfo, "~/info", out),
            "vocabulary": pub(messages.VocabularyMsg, "~/vocabulary", latched_qos()),
        }
        if self._label_info_cls is not None:
            self._pubs["label_info"] = pub(self._label_info_cls, "~/label_info", latched_qos())
        grp = self._cb_services
        self._srvs = [
            self.create_service(SetVocabulary, "~/set_vocabulary", self._srv_set_vocabulary, callback_group=grp),
            self.create_service(GetVocabulary, "~/get_vocabulary", self._srv_get_vocabulary, callback_group=grp),
            self.create_service(Query, "~/query", self._srv_query, callback_group=grp),
        ]

    def _stop_processing(self) -> None:
        with self._publish_lock:
            self._is_active = False
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        if self._points is not None:
            self._points.destroy()
            self._points = None
        self._stop_event.set()
        self._mailbox.close()
        if self._worker is not None:
            self._worker.join(timeout=60.0)  # at most one inference in flight
            self._worker = None
        self._mailbox.clear()

    def _release_all(self) -> None:
        self._stop_processing()
        for p in self._pubs.values():
            self.destroy_publisher(p)
        for s in self._srvs:
            self.destroy_service(s)
        self._pubs, self._srvs = {}, []
        with self._state_lock:
            self._vstate = None
        self._segmenter, self._cfg, self._latest = None, None, None
        gc.collect()
        _empty_cuda_cache()

    def _move_model(self, device: Any) -> None:
        """Move segmenter and vocabulary state to ``device``; only does work when CUDA is involved."""
        if self._segmenter is None or device is None:
            return
        current = str(getattr(self._segmenter, "device", "cpu"))
        if current == str(device):
            return
        self._segmenter.to(device)
        with self._state_lock:
            self._vstate = self._vstate.to(device) if self._vstate is not None else None
        gc.collect()
        _empty_cuda_cache()

    # --- vocabulary ------------------------------------------------------------------------------------
    def _set_state(self, vocab_state: Any) -> None:
        """Swap in a new vocabulary state (one reference) and republish the latched vocabulary/LabelInfo."""
        # Under the publish lock: LabelInfo of a new revision goes out before any frame of it, and frames of
        # the previous revision still in flight are dropped (their ids may be absent from the new LabelInfo).
        with self._publish_lock:
            with self._state_lock:
                self._vstate = vocab_state
                self._revision = max(self._revision, int(vocab_state.vocabulary.revision))
                self._vocab_stamp = self.get_clock().now().to_msg()
            self._publish_vocabulary(vocab_state)
            self._published_revision = int(vocab_state.vocabulary.revision)

    def _vocabulary_msg(self, vocab_state: Any) -> Any:
        prompts = None
        describe = getattr(self._segmenter, "describe_prompts", None)
        if describe is not None:
            try:
                prompts = describe(vocab_state)
            except Exception:  # noqa: BLE001  (optional introspection; names are the fallback)
                prompts = None
        return messages.vocabulary_msg(
            vocab_state.vocabulary, self._vocab_stamp, self._cfg.segmenter, self._model_identity, prompts
        )

    def _publish_vocabulary(self, vocab_state: Any) -> None:
        if "vocabulary" not in self._pubs:
            return
        self._pubs["vocabulary"].publish(self._vocabulary_msg(vocab_state))
        if "label_info" in self._pubs:
            threshold = float(getattr(self._segmenter.config, "prob_threshold", 0.0) or 0.0)
            self._pubs["label_info"].publish(
                messages.label_info_msg(self._label_info_cls, vocab_state.vocabulary, self._vocab_stamp, threshold)
            )

    def _srv_set_vocabulary(self, req: Any, resp: Any) -> Any:
        with self._vocab_change_lock:
            resp.revision = self._revision
            segmenter = self._segmenter
            if segmenter is None:
                resp.success, resp.message = False, "the node is not configured (no model loaded)"
                return resp
            try:
                vocab = Vocabulary.from_request(
                    list(req.classes), list(req.descriptions), [bool(b) for b in req.is_thing],
                    revision=self._revision + 1, source="service",
                )
                nav2_reason = messages.nav2_vocabulary_error(len(vocab), bool(self._cfg and self._cfg.nav2_compatible))
                if nav2_reason:
                    raise VocabularyError(nav2_reason)
                # The expensive part, outside the inference path: the worker keeps using the old state.
                vocab_state = segmenter.encode_vocabulary(vocab)
            except VocabularyError as exc:
                resp.success, resp.message = False, str(exc)
                return resp
            except Exception as exc:  # noqa: BLE001  (a model error must not take the service down)
                resp.success, resp.message = False, f"could not encode the vocabulary: {_reason(exc)}"
                return resp
            self._set_state(vocab_state)
        n = len(vocab)
        preview = ", ".join(vocab.names[:8]) + (", ..." if n > 8 else "")
        encoding, _ = messages.label_encoding(n)
        resp.success = True
        resp.message = f"vocabulary revision {vocab.revision}: {n} classes ({preview}); labels {encoding}"
        resp.class_ids = list(range(n))
        resp.revision = vocab.revision
        self.get_logger().info(resp.message)
        return resp

    def _srv_get_vocabulary(self, req: Any, resp: Any) -> Any:
        with self._state_lock:
            vocab_state = self._vstate
        if vocab_state is not None and self._cfg is not None:
            resp.vocabulary = self._vocabulary_msg(vocab_state)
        return resp

    def _srv_query(self, req: Any, resp: Any) -> Any:
        segmenter, cfg = self._segmenter, self._cfg
        resp.success = False
        if segmenter is None or cfg is None:
            resp.message = "the node is not configured (no model loaded)"
            return resp
        texts = list(req.texts)
        if not texts:
            resp.message = "the query has no texts"
            return resp
        if req.image.width == 0:
            frame = self._latest
            if frame is None:
                sub = self._subs[0].topic_name if self._subs else "image"
                resp.message = (
                    f"no frame has been received yet on {sub} and the request has no image: "
                    "publish a frame first or fill the request's image"
                )
                return resp
            header, image = frame.header, frame.image
        else:
            try:
                header, image = req.image.header, self._convert(req.image, cfg)
            except ConversionError as exc:
                resp.message = f"request image refused: {exc}"
                return resp
        try:
            result = segmenter.query(image, texts)
        except VocabularyError as exc:
            resp.message = str(exc)
            return resp
        except Exception as exc:  # noqa: BLE001
            resp.message = f"query failed: {_reason(exc)}"
            return resp
        resp.header = header
        resp.masks = [numpy_to_image(np.where(m, 255, 0).astype(np.uint8), "mono8", header) for m in result.masks]
        resp.scores = [float(s) for s in result.scores]
        resp.success = True
        resp.message = f"{len(texts)} masks on a {image.shape[1]}x{image.shape[0]} frame"
        return resp

    # --- input ---------------------------------------------------------------------------------------
    def _convert(self, msg: Image, cfg: NodeConfig) -> np.ndarray:
        max_pixels = int(self.get_parameter("max_image_pixels").value)
        if self._bridge is not None:
            return image_msg_to_rgb_bridge(self._bridge, msg, max_pixels)
        return image_msg_to_rgb(msg, max_pixels)

    def _on_image(self, msg: Image) -> None:
        received = time.monotonic()
        try:
            image = self._convert(msg, self._cfg)
        except ConversionError as exc:
            self._refuse(str(exc))
            return
        self._accept(Frame(msg.header, image, received))

    def _on_compressed(self, msg: CompressedImage) -> None:
        received = time.monotonic()
        try:
            image = compressed_to_rgb(msg, int(self.get_parameter("max_image_pixels").value))
        except ConversionError as exc:
            self._refuse(str(exc))
            return
        self._accept(Frame(msg.header, image, received))

    def _accept(self, frame: Frame) -> None:
        with self._stats.lock:
            self._stats.received += 1
        self._latest = frame
        self._mailbox.put(frame)

    def _refuse(self, reason: str) -> None:
        with self._stats.lock:
            self._stats.refused += 1
            self._stats.last_refusal = reason
        self.get_logger().warning(f"frame refused: {reason}", throttle_duration_sec=LOG_THROTTLE_S)

    # --- inference -----------------------------------------------------------------------------------
    def _work(self) -> None:
        segmenter = self._segmenter
        while not self._stop_event.is_set():
            item = self._mailbox.take(timeout=0.25)
            if item is None:
                continue
            frame, dropped = item
            with self._state_lock:
                vocab_state = self._vstate  # read once: this frame uses exactly this vocabulary
            t0 = time.monotonic()
            try:
                result = segmenter.segment(frame.image, vocab_state)
            except Exception as exc:  # noqa: BLE001  (keep serving; the reason goes to diagnostics)
                with self._stats.lock:
                    self._stats.errors += 1
                    self._stats.last_error = _reason(exc)
                self.get_logger().error(f"segmentation failed: {_reason(exc)}", throttle_duration_sec=LOG_THROTTLE_S)
                continue
            inference_ms = (time.monotonic() - t0) * 1e3
            try:
                self._publish_outputs(frame, result, dropped, inference_ms)
            except Exception as exc:  # noqa: BLE001
                self.get_logger().error(f"publishing failed: {_reason(exc)}", throttle_duration_sec=LOG_THROTTLE_S)

    def _palette(self, n: int) -> np.ndarray:
        if self._palette_cache[0] != n:
            from ..core.postprocess import make_palette

            self._palette_cache = (n, make_palette(n))
        return self._palette_cache[1]  # type: ignore[return-value]

    def _publish_outputs(self, frame: Frame, result: Any, dropped: int, inference_ms: float) -> None:
        from ..core.postprocess import colorize, overlay, panoptic_from_semantic

        header, vocab = frame.header, result.vocabulary
        n = len(vocab)
        outputs: list[tuple[str, Any]] = []
        labels, encoding = messages.encode_labels(result.labels, n)
        outputs.append(("labels", numpy_to_image(labels, encoding, header)))
        outputs.append(("confidence", numpy_to_image(messages.encode_confidence(result.confidence), "mono8", header)))
        want_color = self._pubs["color"].get_subscription_count() > 0
        want_overlay = self._pubs["overlay"].get_subscription_count() > 0
        if want_color or want_overlay:
            color = colorize(result.labels, self._palette(n))
            if want_color:
                outputs.append(("color", numpy_to_image(color, "rgb8", header)))
            if want_overlay:
                alpha = float(self.get_parameter("overlay_alpha").value)
                blended = overlay(frame.image, color, alpha, result.labels)
                outputs.append(("overlay", numpy_to_image(blended, "rgb8", header)))
        if self.get_parameter("publish_panoptic").value:
            panoptic = result.panoptic
            if panoptic is None:
                panoptic = panoptic_from_semantic(result.labels, result.confidence, vocab)
            outputs.append(("panoptic", messages.panoptic_msg(header, vocab, panoptic)))
        latency_ms = self._latency_ms(header, frame.received)
        outputs.append(("info", messages.info_msg(
            header, vocab, self._cfg.segmenter, latency_ms, inference_ms, dropped, result.labels)))
        with self._publish_lock:
            if not self._is_active or int(vocab.revision) != self._published_revision:
                return
            for name, msg in outputs:
                self._pubs[name].publish(msg)
        points = self._points
        if points is not None:
            points.publish(header, result.labels, result.confidence, frame.image,
                           unlabeled_id=messages.label_encoding(n)[1])
        with self._stats.lock:
            self._stats.processed += 1
            self._stats.latencies_ms.append(latency_ms)
            self._stats.inference_ms.append(inference_ms)

    def _latency_ms(self, header: Any, received: float) -> float:
        stamp_ns = header.stamp.sec * 1_000_000_000 + header.stamp.nanosec
        if stamp_ns == 0:
            return (time.monotonic() - received) * 1e3
        return (self.get_clock().now().nanoseconds - stamp_ns) / 1e6

    # --- diagnostics ---------------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        s = self._stats
        now = time.monotonic()
        with s.lock:
            counts = (s.received, s.processed, self._mailbox.dropped_total, s.refused)
            dt = max(now - s.tick_time, 1e-6)
            rates = [(c - p) / dt for c, p in zip(counts, s.tick_counts)]
            s.tick_time, s.tick_counts = now, counts
            lat = list(s.latencies_ms)
            inf = list(s.inference_ms)
            last_refusal, errors, last_error = s.last_refusal, s.errors, s.last_error
        state = self._vstate
        status = DiagnosticStatus()
        status.name = f"{self.get_fully_qualified_name()}: segmentation"
        status.hardware_id = str(self._device or "none")
        kv = {
            "state": "active" if self._is_active else ("inactive" if self._cfg is not None else "unconfigured"),
            "segmenter": self._cfg.segmenter if self._cfg else "",
            "model": self._model_identity,
            "device": str(self._device or ""),
            "vocabulary_revision": str(state.vocabulary.revision if state is not None else 0),
            "classes": str(len(state.vocabulary) if state is not None else 0),
            "received_fps": f"{rates[0]:.2f}",
            "processed_fps": f"{rates[1]:.2f}",
            "dropped_fps": f"{rates[2]:.2f}",
            "refused_fps": f"{rates[3]:.2f}",
            "frames_received": str(counts[0]),
            "frames_processed": str(counts[1]),
            "frames_dropped": str(counts[2]),
            "frames_refused": str(counts[3]),
            "last_refusal_reason": last_refusal,
            "errors": str(errors),
            "last_error": last_error,
            "latency_ms_mean": f"{np.mean(lat):.1f}" if lat else "",
            "latency_ms_max": f"{np.max(lat):.1f}" if lat else "",
            "inference_ms_mean": f"{np.mean(inf):.1f}" if inf else "",
        }
        kv.update(_cuda_memory(self._device))
        points = self._points
        points_problem = None
        if points is not None:
            kv.update(points.diagnostics())
            points_problem = points.health()
        if self._last_transition_error:
            kv["last_transition_error"] = self._last_transition_error
        status.values = [KeyValue(key=k, value=v) for k, v in kv.items()]
        if self._cfg is None:
            status.level = DiagnosticStatus.ERROR if self._last_transition_error else DiagnosticStatus.WARN
            status.message = "unconfigured" + (f": {self._last_transition_error}" if self._last_transition_error else "")
        elif not self._is_active:
            status.level, status.message = DiagnosticStatus.WARN, "inactive"
        elif rates[3] > 0:
            status.level, status.message = DiagnosticStatus.WARN, f"refusing frames: {last_refusal}"
        elif errors and rates[1] == 0 and rates[0] > 0:
            status.level, status.message = DiagnosticStatus.ERROR, f"segmentation failing: {last_error}"
        elif rates[0] == 0:
            status.level, status.message = DiagnosticStatus.OK, "active, waiting for images"
        else:
            status.level, status.message = DiagnosticStatus.OK, f"active, {rates[1]:.1f} fps"
        if points_problem and status.level == DiagnosticStatus.OK:
            status.level, status.message = DiagnosticStatus.WARN, points_problem
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = [status]
        self._diag_pub.publish(msg)

    # --- startup -------------------------------------------------------------------------------------
    def autostart_transitions(self) -> bool:
        """configure + activate (the ``autostart`` behaviour); False (logged) when a step fails."""
        if self.trigger_configure() != SUCCESS:
            self.get_logger().error(
                "autostart: configure failed; the node stays unconfigured. Fix the parameters, then trigger "
                "configure and activate (e.g. `ros2 lifecycle set <node> configure`)."
            )
            return False
        if self.trigger_activate() != SUCCESS:
            self.get_logger().error("autostart: activate failed; the node stays inactive")
            return False
        return True

    def destroy_node(self) -> None:
        self._release_all()
        super().destroy_node()


# --- helpers -------------------------------------------------------------------------------------------
def _reason(exc: BaseException) -> str:
    """The exception's message (KeyError's repr quotes dropped), prefixed by its type when it has none."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return str(text) or type(exc).__name__


def _qos_advice(node: LifecycleNode, reliability: str) -> Any:
    """Subscription events that turn a QoS mismatch with the camera (the usual "no output") into advice."""
    try:
        from rclpy.event_handler import SubscriptionEventCallbacks
    except ImportError:  # Humble
        from rclpy.qos_event import SubscriptionEventCallbacks

    other = "best_effort" if reliability == "reliable" else "reliable"

    def incompatible(info: Any) -> None:
        node.get_logger().warning(
            f"a camera publisher offers QoS incompatible with this subscription (image_reliability={reliability}, "
            f"policy {getattr(getattr(info, 'last_policy_kind', None), 'name', '?')}): no frames will arrive from it; "
            f"try image_reliability:={other} or change the publisher",
            throttle_duration_sec=LOG_THROTTLE_S,
        )

    return SubscriptionEventCallbacks(incompatible_qos=incompatible)


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def _cuda_memory(device: Any) -> dict[str, str]:
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


def main(args: Optional[list[str]] = None) -> int:
    """Run the node with a multi-threaded executor; autostart configures and activates it."""
    try:
        rclpy.init(args=args)
    except Exception as exc:  # noqa: BLE001  (RCLError: unparsable --ros-args)
        print(f"segment_node: cannot start: {exc}", file=sys.stderr)
        return 2
    node: Optional[SegmentNode] = None
    executor: Optional[MultiThreadedExecutor] = None
    try:
        node = SegmentNode()
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        if node.autostart:
            node.autostart_transitions()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if executor is not None:
            executor.shutdown(timeout_sec=1.0)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    _exit_now(0)
    return 0


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown, once ROS is shut down cleanly.

    Tearing down torch and open_clip's modules takes seconds on a loaded machine, longer than launch's
    SIGINT -> SIGTERM escalation (5 s), which would turn a clean stop into a killed process.
    """
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001  (closed pipe)
            pass
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
