"""Benchmark-only: swaps the executor segment_node spins on, chosen by ``OVSEG_BENCH_EXECUTOR`` (see
benchmarks/bench_executor.py, which puts this folder on the node's PYTHONPATH).

* ``events``: rclpy.experimental.EventsExecutor (single thread, callbacks dispatched from C++);
* ``multi_threaded:N``: rclpy's MultiThreadedExecutor with N threads instead of the node's 5 + cameras.

Not for use on a robot: under the EventsExecutor (rclpy 9.1) no camera frame reaches the node's image callback
and a coroutine service callback is never answered (docs/benchmarks.md, benchmarks/probe_events_executor.py).
"""

import os
import signal

_choice = os.environ.get("OVSEG_BENCH_EXECUTOR", "")
if _choice:
    from ovseg_ros.ros import process as _process

    if _choice == "events":
        from rclpy.experimental import EventsExecutor

        def _events(num_threads: int = 0) -> object:
            handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            executor = EventsExecutor()
            for sig, handler in handlers.items():  # it installs its own SIGINT/SIGTERM handlers: keep the node's
                signal.signal(sig, handler)
            return executor

        _process.MultiThreadedExecutor = _events  # type: ignore[assignment]
    elif _choice.startswith("multi_threaded:"):
        from rclpy.executors import MultiThreadedExecutor

        _threads = int(_choice.split(":", 1)[1])

        def _fewer(num_threads: int = 0) -> object:
            return MultiThreadedExecutor(num_threads=_threads)

        _process.MultiThreadedExecutor = _fewer  # type: ignore[assignment]
