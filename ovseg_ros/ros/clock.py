"""Time in segment_node under ``use_sim_time``: which clock each thing reads, and what a clock jump resets.

* **Stamps and outputs** keep the input's header: nothing the node publishes per frame is restamped. The
  latched ``~/vocabulary``/``~/label_info`` and ``/diagnostics`` are stamped with ROS time when published
  (0 before the first ``/clock``); consumers order vocabularies by revision, not by that stamp.
* **Periodic work** (the ``/diagnostics`` timer) runs on the *steady* clock: it keeps reporting while
  ``/clock`` is paused or not yet published (a ROS-time timer would stop with it).
* **Waiting and rates** (mailboxes, ``max_wait`` of the depth matcher, fps, error ages) use the monotonic
  wall clock: they bound real resources (memory, how long a cloud is held back), whatever simulated time does.
* **Latency** is reported against the image stamp's clock (:func:`latency_ms`): ROS time now minus the stamp,
  in that clock's seconds - *simulated* seconds under ``use_sim_time`` (at 0.5x real time a frame that took
  100 ms of wall time shows 50 ms). When that difference means nothing - the stamp is zero, the ROS clock has
  not started (sim time before the first ``/clock``), or it is below -1 s or over an hour (stamps of another
  clock: a bag played without ``--clock``, a camera on another machine) - it is the wall time since the image
  arrived instead, and ``/diagnostics`` says which (``latency_clock``: ``stamp`` or ``receipt``). A stamp
  less than 1 s ahead of the node's clock counts as latency 0 (``/clock`` moves in steps).
* **A jump of the ROS clock** backwards, or a switch between system and simulated time (``use_sim_time``
  takes effect at once in rclpy), clears every per-stream state that is ordered by stamps (the depth
  matcher, latency history) through :class:`ClockWatch`, and is counted in ``/diagnostics``
  (``time_jumps``). Stamps going backwards *without* a clock jump (a bag looping, played without
  ``--clock``) are caught by the depth matcher itself (:mod:`.sync`).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

#: A ROS-time latency beyond this is taken as stamps of another clock (see the module docstring).
PLAUSIBLE_LATENCY_S = 3600.0
#: A stamp ahead of ROS time by at most this reads as latency 0: under sim time the node's clock moves in
#: /clock steps (100 Hz from a simulator, less from a bag) and a camera stamped between two steps is "ahead".
AHEAD_TOLERANCE_S = 1.0


def steady_clock() -> Any:
    """rclpy's steady clock (for timers that must run while ``/clock`` is paused)."""
    from rclpy.clock import Clock, ClockType

    return Clock(clock_type=ClockType.STEADY_TIME)


def latency_ms(now_ns: int, stamp_ns: int, received: float, now_mono: Optional[float] = None) -> tuple[float, str]:
    """(latency in ms, ``"stamp"`` or ``"receipt"``): ROS time ``now_ns`` minus the image stamp when that is
    meaningful, else the monotonic time since the image was ``received`` (see the module docstring)."""
    if stamp_ns > 0 and now_ns > 0:
        dt = (now_ns - stamp_ns) / 1e9
        if -AHEAD_TOLERANCE_S <= dt <= PLAUSIBLE_LATENCY_S:
            return max(0.0, dt) * 1e3, "stamp"
    now_mono = time.monotonic() if now_mono is None else now_mono
    return max(0.0, now_mono - received) * 1e3, "receipt"


class ClockWatch:
    """Calls ``on_jump(description)`` when the node's ROS clock jumps backwards or changes source; counts.

    The callback runs in the thread that moves the clock (the ``/clock`` subscription): it must be quick and
    is guarded here (an exception in a jump callback would skip rclpy's later ones).
    """

    def __init__(self, node: Any, on_jump: Callable[[str], None]) -> None:
        from rclpy.clock import JumpThreshold
        from rclpy.duration import Duration

        self._node = node
        self._on_jump = on_jump
        self._lock = threading.Lock()
        self.jumps = 0
        self.last = ""
        # Any backward step (a simulator or bag restart), and activation/deactivation of ROS time.
        threshold = JumpThreshold(min_forward=None, min_backward=Duration(nanoseconds=-1), on_clock_change=True)
        self._handle = node.get_clock().create_jump_callback(threshold, post_callback=self._post)

    def _post(self, jump: Any) -> None:
        try:
            from rclpy.clock import ClockChange

            change = jump.clock_change
            if change == ClockChange.ROS_TIME_ACTIVATED:
                what = "ROS time activated (use_sim_time): now following /clock"
            elif change == ClockChange.ROS_TIME_DEACTIVATED:
                what = "ROS time deactivated: back to system time"
            else:
                what = f"ROS time jumped back by {-jump.delta.nanoseconds / 1e9:.3f} s"
            with self._lock:
                self.jumps += 1
                self.last = what
            self._on_jump(what)
        except Exception as exc:  # noqa: BLE001  (an entry point: count and log, never raise into rcl)
            try:
                self._node.get_logger().error(f"clock jump handling failed: {type(exc).__name__}: {exc}")
            except Exception:  # noqa: BLE001
                pass

    def snapshot(self) -> tuple[int, str]:
        with self._lock:
            return self.jumps, self.last

    def values(self) -> dict[str, str]:
        """/diagnostics keys: which time the node follows, and the jumps seen."""
        clock = self._node.get_clock()
        sim = bool(getattr(clock, "ros_time_is_active", False))
        now_ns = clock.now().nanoseconds
        jumps, last = self.snapshot()
        return {
            "time_source": ("sim (/clock)" if now_ns > 0 else "sim (/clock), no /clock received yet") if sim
            else "system",
            "ros_time_s": f"{now_ns / 1e9:.3f}",
            "time_jumps": str(jumps),
            "time_last_jump": last,
        }

    def destroy(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.unregister()
            except Exception:  # noqa: BLE001  (clock already gone at shutdown)
                pass
