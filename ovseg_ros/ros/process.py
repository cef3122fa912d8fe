"""The segment_node process: executor thread, signals, and a shutdown that nothing can interrupt.

SIGINT (Ctrl-C delivers it twice under ``ros2 launch`` in a terminal) and SIGTERM only set an event; the main
thread then stops outputs, the executor, the node and ROS, in that order, each step bounded, and exits with 0
without the interpreter's slow teardown. The whole sequence takes at most :data:`SHUTDOWN_BOUND_S` after the
signal, whatever runs: an inference in flight (a slow model, seconds per frame) is abandoned, not waited for -
the gate is closed first, so its result can never be published. That is shorter than launch's escalation
(SIGINT -> SIGTERM after ``sigterm_timeout``, 5 s by default; SIGTERM -> SIGKILL 5 s later). A dead executor
exits non-zero so that launch's ``respawn`` restarts the node.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Optional

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

from .guard import reason
from .params import PARAMS, current_values
from .segment_node import SegmentNode

#: Longest time from SIGINT/SIGTERM to the process exit (tested with a 6 s-per-frame segmenter in flight):
#: spinner join 0.25 + pipeline stop 0.25 (twice at most) + executor shutdown 0.5 + ROS shutdown, with margin.
SHUTDOWN_BOUND_S = 2.0


def _init_without_signal_handlers(args: Optional[list[str]]) -> None:
    """rclpy.init, leaving SIGINT/SIGTERM to us (rclpy's handler would raise inside any thread's code)."""
    try:
        from rclpy.signals import SignalHandlerOptions

        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except (ImportError, TypeError):  # an rclpy without the option
        rclpy.init(args=args)


def wants_help(args: list[str]) -> bool:
    """``-h``/``--help`` before ``--ros-args`` (after it the words belong to ROS, which has its own)."""
    ours = args[:args.index("--ros-args")] if "--ros-args" in args else args
    return any(a in ("-h", "--help") for a in ours)


def usage() -> str:
    """What ``ros2 run ovseg_ros segment_node --help`` prints: how to pass ROS arguments, and every parameter."""
    lines = [
        "usage: segment_node [-h] [--ros-args [-r FROM:=TO] [-p NAME:=VALUE] [--params-file FILE] ...]",
        "",
        "Open-vocabulary segmentation lifecycle node (configures and activates itself unless autostart:=false).",
        "Usually started with `ros2 launch ovseg_ros segment.launch.py`; remap the camera with -r image:=<topic>.",
        "",
        "  -h, --help            show this help and exit",
        "  --ros-args            ROS arguments follow: -r FROM:=TO (remap), -p NAME:=VALUE (parameter),",
        "                        --params-file FILE (YAML), --log-level LEVEL",
        "",
        "parameters (default; when a change takes effect):",
    ]
    for p in PARAMS:
        lines.append(f"  {p.name} ({p.type}, default {p.default!r}; {p.when})")
        lines.append(f"      {p.description}")
    return "\n".join(lines)


def run(args: Optional[list[str]] = None) -> int:
    """Run the node; SIGINT (once or twice) and SIGTERM stop it cleanly and quietly with exit code 0.

    The executor spins in a worker thread; the main thread only waits for a stop request. Our signal
    handlers only set an event, so a second Ctrl-C (terminal + launch deliver two) cannot interrupt the
    shutdown sequence: stop outputs, stop the executor, destroy the node, shut ROS down, exit.
    """
    user_args = list(sys.argv[1:] if args is None else args)
    if wants_help(user_args):
        print(usage())
        return 0
    stop = threading.Event()  # set by a signal, or by the executor thread when it ends
    requested = threading.Event()  # set by a signal only

    def request_stop(signum: int, frame: Any) -> None:
        requested.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    try:
        _init_without_signal_handlers(args)
    except Exception as exc:  # noqa: BLE001  (RCLError: unparsable --ros-args)
        print(f"segment_node: cannot start: {exc}", file=sys.stderr)
        return 2
    node: Optional[SegmentNode] = None
    executor: Optional[MultiThreadedExecutor] = None
    code = 0
    try:
        node = SegmentNode()
        # Threads: one per camera's image callbacks, services, lifecycle, diagnostics, and spares. A
        # set_vocabulary or query waiting for its job holds none (coroutines, see .vocabulary_service).
        cameras = len(current_values(node)["cameras"]) or 1
        executor = MultiThreadedExecutor(num_threads=5 + cameras)
        executor.add_node(node)
        # Autostart before spinning: the node is seen "active" (or failed) by the time it answers get_state.
        if node.autostart and not stop.is_set():
            node.autostart_transitions()
        spinner = threading.Thread(target=_spin, args=(executor, stop, node), name="ovseg_executor", daemon=True)
        spinner.start()
        while not stop.wait(0.5):  # a bounded wait: signal handlers run between waits
            pass
        spinner.join(0.25)
        if not requested.is_set() and rclpy.ok():
            code = 1  # the executor gave up: a non-zero exit lets launch's respawn restart the node
    except Exception as exc:  # noqa: BLE001
        print(f"segment_node: {type(exc).__name__}: {reason(exc)}", file=sys.stderr)
        code = 1
    finally:
        _stop_everything(node, executor)
    _exit_now(code)
    return code


def _spin(executor: MultiThreadedExecutor, stop: threading.Event, node: SegmentNode) -> None:
    """Spin until a stop is requested or ROS shuts down.

    rclpy's executor raises ``InvalidHandle`` out of ``spin()`` when a subscription or timer is destroyed (by a
    transition on another thread) while it gathers its wait set; the executor is intact afterwards, so the
    error is counted and spinning goes on instead of ending the process. Anything else that escapes (every
    callback is guarded, so it would be an rclpy fault) is counted and retried too, a bounded number of times
    in a row.
    """
    from rclpy.exceptions import InvalidHandle

    failures = 0
    try:
        while not stop.is_set() and rclpy.ok():
            try:
                executor.spin()
                break  # the executor was shut down
            except ExternalShutdownException:
                break
            except InvalidHandle:
                # An ordinary transition destroyed an entity the executor was about to wait on: recovered with no
                # effect, so counted (diagnostics "executor_recovered") but not an error that turns status WARN.
                node.errors.record_recovered("executor: entity destroyed while waited on")
            except Exception as exc:  # noqa: BLE001
                failures += 1
                node.errors.record("executor", f"{type(exc).__name__}: {reason(exc)}")
                if failures > 100:
                    print(f"segment_node: executor failing: {type(exc).__name__}: {reason(exc)}", file=sys.stderr)
                    return
                time.sleep(0.01)
    finally:
        stop.set()


def _stop_everything(node: Optional[SegmentNode], executor: Optional[MultiThreadedExecutor]) -> None:
    """Each step bounded and guarded: a clean stop must not depend on every step succeeding."""
    steps = []
    if node is not None:
        steps.append(node.stop_outputs)
    if executor is not None:
        steps.append(lambda: executor.shutdown(timeout_sec=0.5))
    if node is not None:
        steps.append(node.destroy_node)
    steps.append(rclpy.try_shutdown)
    for step in steps:
        try:
            step()
        except Exception:  # noqa: BLE001  (shutting down: nothing useful to do with it)
            pass


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown, once ROS is shut down cleanly.

    Tearing down torch and open_clip's modules takes seconds on a loaded machine, longer than launch's
    SIGINT -> SIGTERM escalation (5 s), and the pipeline's daemon threads may still be inside a forward.
    """
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001  (closed pipe)
            pass
    os._exit(code)
