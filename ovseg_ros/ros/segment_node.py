"""``segment_node``: open-vocabulary semantic/panoptic segmentation of camera streams (lifecycle node).

The node wires its parts; nothing per frame happens here:

* :mod:`.gate` - the output gate: publish lock, active flag, current binding; every output passes it;
* :mod:`.camera` - one camera's subscriptions, conversion, latest-frame mailbox, publishers, counters, and
  publishing one segmented frame through the gate;
* :mod:`.pipeline` - inference thread -> publishing thread, latest item between stages;
* :mod:`.vocabulary_service` - set/get vocabulary and query, encoding off the executor, swaps through the gate;
* :mod:`.diagnostics` - counters and the whole ``/diagnostics`` message; :mod:`.guard` - no exception escapes
  a callback;
* :mod:`.process` - the executable: executor thread, signals, shutdown.

Parts get the node's hooks when they are built (:class:`~.camera.CameraHooks`,
:class:`~.vocabulary_service.VocabularyHooks`); the node never patches their attributes afterwards.

Lifecycle:

* configure - validate parameters, build the segmenter (loads the model), encode the initial vocabulary,
  create the cameras' publishers. Failure: FAILURE with the reason logged, back to unconfigured.
* activate - model to its device, subscribe the cameras, start the pipeline.
* deactivate - the gate closes (outputs stop at once), unsubscribe, stop the pipeline, model to CPU.
* cleanup - waiting service calls are released, publishers destroyed, the model dropped.

Services, the latched vocabulary publishers and diagnostics live as long as the node: a transition never
destroys a handle that a running callback may use (a call during cleanup is answered, not crashed).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import threading
import time
from typing import Any, Optional

from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import QoSProfile

from ovseg_ros.srv import GetVocabulary, Query, SetVocabulary

from ..core.vocabulary import MAX_CLASSES, Vocabulary, VocabularyError
from . import messages
from .camera import Camera, CameraHooks, OutputOptions, camera_specs, convert_image
from .clock import ClockWatch, latency_ms, steady_clock
from .conversions import make_cv_bridge
from .diagnostics import NodeView, node_diagnostics
from .gate import OutputGate
from .guard import (
    LOG_THROTTLE_S,
    ErrorLog,
    guarded,
    guarded_service,
    guarded_transition,
    reason,
    sanitize,
    sanitize_python_logging,
)
from .outputs import Palette, label_info_message, vocabulary_message
from .params import (
    LIVE,
    video_options,
    ON_ACTIVATE,
    SPECS,
    NodeConfig,
    current_values,
    declare_parameters,
    initial_vocabulary,
    validate,
    validate_all,
)
from .pipeline import Pipeline
from .points import PointsOptions
from .qos import input_qos, latched_qos
from .vocabulary_service import Binding, VocabularyHooks, VocabularyService
from .vocabulary_store import VocabularyStore, fingerprint, restore

SUCCESS = TransitionCallbackReturn.SUCCESS
FAILURE = TransitionCallbackReturn.FAILURE
ERROR = TransitionCallbackReturn.ERROR
#: How long deactivate/cleanup wait for an inference in flight before reporting it (outputs stop at once).
STOP_TIMEOUT_S = 10.0
#: How long shutdown (transition, signal, destroy) waits for the pipeline threads: an inference in flight is
#: abandoned (its result can no longer be published, the gate is closed) rather than waited for, so the process
#: exits within process.SHUTDOWN_BOUND_S of a signal whatever the model's speed.
SHUTDOWN_WAIT_S = 0.25


class SegmentNode(LifecycleNode):
    """The segmentation lifecycle node. See the module docstring."""

    def __init__(self, node_name: str = "segment_node", **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        sanitize_python_logging()  # the core's own log lines quote outside text too
        self.errors = ErrorLog()
        self._param_errors = declare_parameters(self)
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._cfg: Optional[NodeConfig] = None
        self._device: Any = None
        self.gate = OutputGate()  # "inactive => nothing published", "nothing of an old binding", and their order
        self._frames_ready = threading.Event()
        self._cameras: list[Camera] = []
        self._pipeline: Optional[Pipeline] = None
        self._palette = Palette()
        self._last_transition_error = ""
        self._bridge = make_cv_bridge()

        self._cb_services = ReentrantCallbackGroup()
        self._cb_timer = MutuallyExclusiveCallbackGroup()
        self.vocab = VocabularyService(self, self.gate, VocabularyHooks(
            announce=self._publish_latched,
            latest_frame=self._latest_frame,
            convert=lambda msg: convert_image(msg, self._bridge, self._max_pixels()),
            check_vocabulary=self._check_vocabulary,
            now=lambda: self.get_clock().now().to_msg(),
        ))
        self._label_info_cls = messages.label_info_type()
        self._vocab_pub = self.create_publisher(messages.VocabularyMsg, "~/vocabulary", latched_qos())
        self._label_info_pub = (
            self.create_publisher(self._label_info_cls, "~/label_info", latched_qos())
            if self._label_info_cls is not None else None
        )
        services = (
            # coroutines: a request waiting for its encoding or query holds no executor thread
            (SetVocabulary, "set_vocabulary", self.vocab.srv_set_vocabulary_async),
            (GetVocabulary, "get_vocabulary", self.vocab.srv_get_vocabulary),
            (Query, "query", self.vocab.srv_query_async),
        )
        self._srvs = [
            self.create_service(srv_type, f"~/{name}", guarded_service(self, self.errors, name, callback),
                                callback_group=self._cb_services)
            for srv_type, name, callback in services
        ]
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))
        self._diag_period = float(self.get_parameter("diagnostics_period").value)
        self._diag_cb = guarded(self, self.errors, "diagnostics timer", self._publish_diagnostics)
        # Steady clock: /diagnostics keeps coming while /clock is paused or absent (see .clock).
        self._steady = steady_clock()
        self._diag_timer = self.create_timer(self._diag_period, self._diag_cb, self._cb_timer, clock=self._steady)
        self._latency_clock = ""
        self._clock_watch = ClockWatch(self, self._on_time_jump)
        if self._bridge is None:
            self.get_logger().debug("cv_bridge not importable: using ovseg_ros's own image conversion")

    # --- compatibility accessors (tests, tools) ----------------------------------------------------------
    @property
    def segmenter(self) -> Any:
        binding = self.vocab.binding
        return binding.segmenter if binding is not None else None

    @property
    def cameras(self) -> list[Camera]:
        return list(self._cameras)

    @property
    def active(self) -> bool:
        return self.gate.active

    # --- hooks given to the parts ----------------------------------------------------------------------
    def _max_pixels(self) -> int:
        return int(self.get_parameter("max_image_pixels").value)

    def _output_options(self) -> OutputOptions:
        return OutputOptions(float(self.get_parameter("overlay_alpha").value),
                             bool(self.get_parameter("publish_panoptic").value),
                             int(self.get_parameter("panoptic_min_area").value),
                             str(self.get_parameter("panoptic_format").value))

    def _check_vocabulary(self, vocabulary: Vocabulary) -> Optional[str]:
        cfg = self._cfg
        return messages.nav2_vocabulary_error(len(vocabulary), cfg.nav2_compatible) if cfg is not None else None

    # --- parameters ----------------------------------------------------------------------------------
    def _on_set_parameters(self, params: list) -> SetParametersResult:
        try:
            values = current_values(self)
            values.update({p.name: p.value for p in params})
            for p in params:
                why = validate(p.name, p.value, values)
                if why:
                    self.get_logger().warning(f"parameter {p.name} refused: {why}")
                    return SetParametersResult(successful=False, reason=why)
            for p in params:
                self._param_errors.pop(p.name, None)  # a bad startup override is fixed by a valid value
            # Only our own table says when; rclpy's use_sim_time takes effect at once (its TimeSource).
            changed = [p.name for p in params if p.name in SPECS and p.name not in LIVE]
            for p in params:
                if p.name == "use_sim_time":
                    self.get_logger().info(f"use_sim_time set to {p.value}: takes effect now")
            if changed and self._cfg is not None:
                when = "activate" if set(changed) <= ON_ACTIVATE else "configure"
                self.get_logger().info(f"parameters {changed} take effect at the next {when}")
            return SetParametersResult(successful=True)
        except Exception as exc:  # noqa: BLE001  (a validator bug must refuse, not kill the node)
            why = f"could not validate: {type(exc).__name__}: {reason(exc)}"
            self.errors.record("parameters", why)
            return SetParametersResult(successful=False, reason=why)

    @property
    def autostart(self) -> bool:
        return bool(self.get_parameter("autostart").value)

    # --- lifecycle -----------------------------------------------------------------------------------
    # rclpy registers these bound methods at construction; each delegates to its implementation through a
    # guard, so an exception is logged, counted and answered FAILURE (ERROR where resources may be half gone).
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition("configure", self._configure, state, FAILURE)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition("activate", self._activate, state, FAILURE)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition("deactivate", self._deactivate, state, ERROR)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition("cleanup", self._cleanup, state, ERROR)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition("shutdown", self._shutdown, state, ERROR)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition("error processing", self._error, state, FAILURE)

    def _transition(self, name: str, fn: Any, state: LifecycleState, failure: TransitionCallbackReturn) -> Any:
        result = guarded_transition(self, self.errors, name, fn, failure)(state)
        if result is failure and not self._last_transition_error:
            _, last, _ = self.errors.snapshot()
            self._last_transition_error = f"{name} failed: {last}"
        return result

    def _configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Build the segmenter and the initial vocabulary; FAILURE (with the reason logged) if impossible."""
        values = current_values(self)
        reasons = list(self._param_errors.values()) + validate_all(values)
        if reasons:
            return self._fail("invalid parameters: " + "; ".join(reasons))
        from ..core.models import resolve_device, select_device
        from ..core.segmenter import build_segmenter

        t0 = time.monotonic()
        try:
            cfg = NodeConfig.from_values(values)
            device = resolve_device(cfg.device)
            select_device(device)  # this thread encodes the first vocabulary on it
            vocabulary = initial_vocabulary(cfg)
            nav2_reason = messages.nav2_vocabulary_error(len(vocabulary), cfg.nav2_compatible)
            if nav2_reason:
                raise VocabularyError(nav2_reason)
            preset = cfg.resolved_preset()
            self.get_logger().info(f"loading segmenter {cfg.segmenter!r} (preset {preset or '-'!r}) on {device}")
            segmenter = build_segmenter(
                cfg.segmenter, preset, cfg.segmenter_overrides(), device=device,
                cache_dir=os.path.expanduser(cfg.cache_dir) if cfg.cache_dir else "", offline=cfg.offline,
                backend=cfg.backend_options(device),
                text_cache_mb=cfg.text_cache_mb,
            )
            restored = self._restore_vocabulary(cfg, vocabulary)
            vocab_state = None
            if restored.vocabulary is not None:
                try:
                    vocab_state = segmenter.encode_vocabulary(restored.vocabulary)
                except VocabularyError as exc:  # e.g. another segmenter whose limits it exceeds
                    self.get_logger().warning(f"the restored vocabulary is refused by {cfg.segmenter}: "
                                              f"{reason(exc)}; using the configured one")
            if vocab_state is None:
                vocab_state = segmenter.encode_vocabulary(vocabulary)
            identity = cfg.model_identity(segmenter)
        except Exception as exc:  # noqa: BLE001  (say what it was, stay unconfigured)
            prefix = "" if isinstance(exc, (VocabularyError, ValueError, OSError)) else f"{type(exc).__name__}: "
            return self._fail(prefix + reason(exc))
        self._cfg, self._device = cfg, device
        if identity.endswith("@random"):
            self.get_logger().warning("the model has RANDOM weights: outputs are meaningless (tests/demo only)")
        hooks = CameraHooks(gate=self.gate, errors=self.errors, ready=self._frames_ready, bridge=self._bridge,
                            max_pixels=self._max_pixels, output_options=self._output_options,
                            latency_ms=self._latency_ms, palette=self._palette,
                            video_options=lambda: video_options(self), stamp_ns=self._stamp_ns)
        self._cameras = [Camera(self, spec, hooks) for spec in camera_specs(list(cfg.cameras))]
        for cam in self._cameras:
            cam.create_outputs()
        self.vocab.install(segmenter, vocab_state, cfg.segmenter, identity)
        if cfg.diagnostics_period != self._diag_period:
            self.destroy_timer(self._diag_timer)
            self._diag_period = cfg.diagnostics_period
            self._diag_timer = self.create_timer(self._diag_period, self._diag_cb, self._cb_timer,
                                                 clock=self._steady)
        self.get_logger().info(
            f"configured in {time.monotonic() - t0:.1f} s: {cfg.segmenter} {identity}, "
            f"{len(vocab_state.vocabulary)} classes, {len(self._cameras)} camera(s)"
        )
        self._last_transition_error = ""
        return SUCCESS

    def _activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Move the model to its device, subscribe, start the pipeline."""
        if self._pipeline is not None and self._pipeline.alive():
            if not self._pipeline.stop(STOP_TIMEOUT_S):
                return self._fail("the previous inference is still running; try activate again later", "activate")
        cfg = NodeConfig.from_values(current_values(self))  # ON_ACTIVATE parameters may have changed
        try:
            qos = input_qos(cfg.image_reliability, cfg.image_queue_depth)
            points = PointsOptions(cfg.min_depth, cfg.max_depth, cfg.points_rgb, cfg.depth_slop,
                                   cfg.max_image_pixels, depth_bytes=cfg.depth_buffer_mb * 2**20,
                                   ) if cfg.publish_points else None
            self._move_model(self._device)
        except Exception as exc:  # noqa: BLE001
            return self._fail(reason(exc), "activate")
        events = _qos_advice(self, cfg.image_reliability)
        self._frames_ready.clear()
        for cam in self._cameras:
            cam.subscribe(qos, cfg.use_compressed, cam.callback_group, events)
            if points is not None:
                cam.start_points(qos, points)
        self._pipeline = Pipeline(self, self._cameras, self._frames_ready, lambda: self.vocab.binding, self.errors)
        self._pipeline.start()
        self.gate.open()
        topics = ", ".join(t for cam in self._cameras for t in cam.topics)
        self.get_logger().info(f"active: segmenting {topics} ({cfg.image_reliability})")
        return super().on_activate(state)

    def _deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop outputs and inputs, then release GPU memory (the model waits on the CPU)."""
        self._stop_processing()
        self._move_model("cpu")
        self.get_logger().info("inactive: not subscribed, model released to CPU")
        return super().on_deactivate(state)

    def _cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_all()
        self.get_logger().info("cleaned up")
        return SUCCESS

    def _shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_all(SHUTDOWN_WAIT_S)
        return SUCCESS

    def _error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error("error during a transition; releasing everything (back to unconfigured)")
        self._release_all()
        return SUCCESS

    def _fail(self, why: str, transition: str = "configure") -> TransitionCallbackReturn:
        self._last_transition_error = sanitize(f"{transition} failed: {why}")
        self.get_logger().error(self._last_transition_error)
        return FAILURE

    def _restore_vocabulary(self, cfg: NodeConfig, configured: Vocabulary) -> Any:
        """Continue revisions, class ids and (persist_vocabulary) the runtime vocabulary of a previous run."""
        store = VocabularyStore(os.path.expanduser(cfg.cache_dir), self.get_fully_qualified_name()) \
            if cfg.cache_dir else None
        id_limit = messages.MONO8_MAX_CLASSES if cfg.nav2_compatible else MAX_CLASSES
        restored = restore(store, configured, cfg.persist_vocabulary, id_limit)
        if restored.vocabulary is not None and messages.nav2_vocabulary_error(len(restored.vocabulary),
                                                                              cfg.nav2_compatible):
            restored = dataclasses.replace(restored, vocabulary=None)
        if restored.note:
            log = self.get_logger().warning if restored.warning else self.get_logger().info
            log(restored.note)
        self.vocab.seed(store, restored.revision, restored.table, id_limit, fingerprint(configured))
        return restored

    def _stop_processing(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Outputs stop at once; inputs and threads after. Safe to call in any state, any number of times."""
        self.gate.close()
        for cam in self._cameras:
            cam.unsubscribe()
            cam.video.reset("deactivate")  # tracks and filter start again at the next activate
        if self._pipeline is not None and not self._pipeline.stop(timeout):
            # Nothing of it can be published any more; activate refuses to start a second one meanwhile.
            self.get_logger().warning(
                f"an inference is still running after {timeout:g} s; its result will be dropped")

    def _release_all(self, timeout: float = STOP_TIMEOUT_S) -> None:
        self._stop_processing(timeout)
        self.vocab.drop()
        for cam in self._cameras:
            cam.destroy_outputs()
        self._cameras = []
        self._cfg = None
        gc.collect()
        _empty_cuda_cache()

    def _move_model(self, device: Any) -> None:
        """Move segmenter and vocabulary state to ``device`` through the gate (a vocabulary swapped in meanwhile
        is moved too, never reverted); only does work when the device differs."""
        binding = self.vocab.binding
        if binding is None or device is None:
            return
        if str(getattr(binding.segmenter, "device", "cpu")) == str(device):
            return  # nothing to move (a swap places its state on the model's device); no gc pass per transition
        if not self.vocab.move(device):
            raise RuntimeError(f"could not move the model to {device}: the vocabulary kept changing under the move")
        gc.collect()
        _empty_cuda_cache()

    def _latest_frame(self) -> Any:
        """The newest camera frame, only while active (a query while inactive must not use an old frame)."""
        if not self.gate.active:
            return None
        frames = [cam.latest for cam in self._cameras if cam.latest is not None]
        return max(frames, key=lambda f: f.received) if frames else None

    # --- latched outputs (called under the gate's lock) ----------------------------------------------------
    def _publish_latched(self, binding: Binding, stamp: Any) -> None:
        """~/vocabulary and ~/label_info of ``binding`` (the gate calls this under its lock, before the swap)."""
        self._vocab_pub.publish(vocabulary_message(binding, stamp))
        if self._label_info_pub is not None:
            self._label_info_pub.publish(label_info_message(self._label_info_cls, binding, stamp))

    def _stamp_ns(self, frame: Any) -> int:
        """The frame's stamp (ROS time); the node's clock for an unset stamp."""
        stamp_ns = frame.header.stamp.sec * 1_000_000_000 + frame.header.stamp.nanosec
        return stamp_ns if stamp_ns else self.get_clock().now().nanoseconds

    def _latency_ms(self, frame: Any) -> float:
        """Against the image stamp's clock (simulated seconds under use_sim_time); see :func:`.clock.latency_ms`.
        Given to the cameras as a hook (they time each frame they publish)."""
        stamp_ns = frame.header.stamp.sec * 1_000_000_000 + frame.header.stamp.nanosec
        ms, self._latency_clock = latency_ms(self.get_clock().now().nanoseconds, stamp_ns, frame.received)
        return ms

    def _on_time_jump(self, what: str) -> None:
        """The ROS clock jumped back or changed source: per-stream state ordered by stamps starts afresh."""
        for cam in list(self._cameras):
            points = cam.points
            if points is not None:
                points.reset()
            with cam.stats.lock:
                cam.stats.latencies_ms.clear()
            cam.video.reset("time_jump_back")  # tracks and label votes belong to the old timeline
        self.get_logger().warning(f"{what}: depth matching, latency history, tracks and label votes cleared",
                                  throttle_duration_sec=LOG_THROTTLE_S)

    # --- diagnostics (reads counters only) ---------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        n_errors, last_error, error_age = self.errors.snapshot()
        view = NodeView(
            base=self.get_fully_qualified_name(), binding=self.vocab.binding, configured=self._cfg is not None,
            active=self.gate.active, device=self._device, cameras=list(self._cameras),
            errors=(n_errors, last_error, error_age), recovered=sum(self.errors.recovered.values()),
            transition_error=self._last_transition_error,
            extra={**self._clock_watch.values(), "latency_clock": self._latency_clock})
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = node_diagnostics(view)
        self._diag_pub.publish(msg)

    # --- startup / shutdown ------------------------------------------------------------------------------
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

    def stop_outputs(self) -> None:
        """First step of shutdown: nothing is published from now on, waiting service calls return."""
        self.gate.close()
        self.vocab.jobs.cancel_all()
        if self._pipeline is not None:
            self._pipeline.stop(SHUTDOWN_WAIT_S)

    def destroy_node(self) -> None:
        self.stop_outputs()
        self._release_all(SHUTDOWN_WAIT_S)
        self._clock_watch.destroy()
        super().destroy_node()


# --- helpers -------------------------------------------------------------------------------------------
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

    return SubscriptionEventCallbacks(
        incompatible_qos=guarded(node, getattr(node, "errors", ErrorLog()), "QoS event", incompatible))


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def main(args: Optional[list[str]] = None) -> int:
    """The ``segment_node`` executable (process lifetime and signals: :mod:`.process`)."""
    from .process import run

    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
