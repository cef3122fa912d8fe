"""Test harness for the ROS layer: a client node spinning in a thread, message collectors, the real
``segment_node`` as a subprocess of the built package, and image factories.

All waits have timeouts so a broken node fails a test instead of hanging the suite.
"""

from __future__ import annotations

import array
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import sys

import numpy as np

# The demo's client helpers (synthetic camera, node subprocess) live beside it in scripts/, not in the package.
_SCRIPTS = str(Path(__file__).resolve().parents[2] / "scripts")
if _SCRIPTS not in sys.path:
    sys.path.insert(0, _SCRIPTS)

import stream_client  # noqa: E402
from stream_client import NodeProcess, StreamClient  # noqa: E402

__all__ = ["NodeProcess", "RosClient", "Collector"]  # NodeProcess: the installed node as a child process


def ros_unavailable_reason() -> Optional[str]:
    """Why ROS integration tests cannot run here (None when they can)."""
    try:
        import rclpy  # noqa: F401
    except ImportError as exc:
        return f"rclpy is not importable ({exc}); run `bash scripts/test.sh` or source scripts/env.sh"
    try:
        import ovseg_ros.msg  # noqa: F401
        import ovseg_ros.srv  # noqa: F401
    except ImportError as exc:
        return f"ovseg_ros interfaces are not built ({exc}); run scripts/setup.sh and source scripts/env.sh"
    if node_executable() is None:
        return "segment_node is not installed; run scripts/setup.sh and source scripts/env.sh"
    return None


def messages_or_skip() -> Any:
    """``ovseg_ros.ros.messages`` (the message builders), or skip the test when rclpy or the interfaces are
    missing (unit tests of the builders need no running graph)."""
    import pytest

    pytest.importorskip("rclpy", reason="rclpy not importable")
    try:
        from ovseg_ros.ros import messages
    except ImportError as exc:
        pytest.skip(f"ovseg_ros interfaces are not built ({exc})")
    return messages


@contextlib.contextmanager
def active_inprocess_node(namespace: str, params: dict, threads: int = 4) -> Iterator[Any]:
    """A ``SegmentNode`` in this process with ``params``, spun by a multi-threaded executor in a thread,
    configured and activated; shut down and destroyed on exit."""
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from ovseg_ros.ros.segment_node import SegmentNode

    n = SegmentNode(namespace=namespace, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    ex = MultiThreadedExecutor(num_threads=threads)
    ex.add_node(n)
    thread = threading.Thread(target=ex.spin, daemon=True)
    thread.start()
    try:
        assert n.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert n.trigger_activate() == TransitionCallbackReturn.SUCCESS
        yield n
    finally:
        ex.shutdown(timeout_sec=2.0)
        n.destroy_node()
        thread.join(timeout=5.0)


def require_ros_or_skip() -> None:
    """Skip the calling test module when ROS is unavailable; fail instead under ``OVSEG_REQUIRE_ROS=1``
    (scripts/test.sh sets it: there, a skipped integration suite would hide a broken build)."""
    reason = ros_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("OVSEG_REQUIRE_ROS") == "1":
        raise RuntimeError(f"OVSEG_REQUIRE_ROS=1 but {reason}")
    import pytest

    pytest.skip(reason, allow_module_level=True)


def node_executable() -> Optional[Path]:
    """The installed segment_node, or None when the package is not built/sourced."""
    try:
        exe = stream_client.node_executable()
    except Exception:  # noqa: BLE001  (ament index missing, or package not found)
        return None
    return exe if exe.is_file() else None


# --- QoS used by test subscribers -----------------------------------------------------------------------
def reliable(depth: int = 50) -> Any:
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    return QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE)


def latched() -> Any:
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


# --- client side --------------------------------------------------------------------------------------
class Collector:
    """Subscription callback that keeps every message; tests wait on it."""

    def __init__(self) -> None:
        self.msgs: list[Any] = []
        self._cond = threading.Condition()
        self.subscription: Any = None

    def __call__(self, msg: Any) -> None:
        with self._cond:
            self.msgs.append(msg)
            self._cond.notify_all()

    def snapshot(self) -> list[Any]:
        with self._cond:
            return list(self.msgs)

    def clear(self) -> None:
        with self._cond:
            self.msgs.clear()

    def wait_for(
        self, predicate: Callable[[Any], bool] = lambda m: True, timeout: float = 20.0, new_only: bool = False
    ) -> Optional[Any]:
        """First message satisfying ``predicate``: already received (unless ``new_only``) or arriving within
        ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = len(self.msgs) if new_only else 0
            while True:
                for msg in self.msgs[seen:]:
                    if predicate(msg):
                        return msg
                seen = len(self.msgs)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.1))


class RosClient(StreamClient):
    """The demo's client node (its own executor thread) plus what tests need: collectors, lifecycle calls."""

    def subscribe(self, topic: str, msg_type: type, qos: Any = None) -> Collector:
        col = Collector()
        col.subscription = self.node.create_subscription(msg_type, topic, col, qos or reliable())
        return col

    def unsubscribe(self, col: Collector) -> None:
        self.node.destroy_subscription(col.subscription)

    def publisher(self, topic: str, msg_type: type, qos: Any = None) -> Any:
        return self.node.create_publisher(msg_type, topic, qos or reliable(10))

    def lifecycle_state(self, node_fqn: str, timeout: float = 20.0) -> str:
        from lifecycle_msgs.srv import GetState

        return self.call(GetState, f"{node_fqn}/get_state", GetState.Request(), timeout).current_state.label

    def change_state(self, node_fqn: str, label: str, timeout: float = 60.0) -> bool:
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        req = ChangeState.Request()
        req.transition = Transition(label=label)
        return bool(self.call(ChangeState, f"{node_fqn}/change_state", req, timeout).success)


def publish_until(
    pub: Any,
    make_msg: Callable[[int], Any],
    collector: Collector,
    predicate: Callable[[Any, list[Any]], bool],
    timeout: float = 30.0,
    period: float = 0.15,
) -> tuple[Optional[Any], list[Any]]:
    """Publish ``make_msg(i)`` every ``period`` s until ``collector`` holds a message satisfying
    ``predicate(msg, sent)``; (that message, sent messages). Repeats cover discovery and best-effort loss."""
    sent: list[Any] = []
    deadline = time.monotonic() + timeout
    i = 0
    while time.monotonic() < deadline:
        msg = make_msg(i)
        sent.append(msg)
        pub.publish(msg)
        i += 1
        hit = collector.wait_for(lambda m: predicate(m, sent), timeout=period)
        if hit is not None:
            return hit, sent
    return None, sent


# --- images -------------------------------------------------------------------------------------------
_counter = iter(range(1, 10**9))


def unique_stamp() -> tuple[int, int]:
    """A distinctive (sec, nanosec) so outputs can be matched to their input exactly."""
    n = next(_counter)
    return 1_000_000 + n, 123_456_789 - n


def make_image(
    width: int = 64,
    height: int = 48,
    encoding: str = "rgb8",
    stamp: Optional[tuple[int, int]] = None,
    frame_id: str = "test_camera",
    data: Optional[bytes] = None,
    step: Optional[int] = None,
    is_bigendian: bool = False,
) -> Any:
    """A sensor_msgs/Image with a structured test pattern (or the given raw ``data``/``step``)."""
    from sensor_msgs.msg import Image

    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "mono16": 1, "8UC3": 3, "8UC1": 1}.get(
        encoding, 3)
    itemsize = 2 if encoding == "mono16" else 1
    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp or unique_stamp()
    msg.header.frame_id = frame_id
    msg.width, msg.height, msg.encoding = width, height, encoding
    msg.is_bigendian = is_bigendian
    if data is None:
        pattern = pattern_image(width, height, channels, np.uint16 if itemsize == 2 else np.uint8)
        if is_bigendian:
            pattern = pattern.astype(">u2")
        data = pattern.tobytes()
    msg.step = step if step is not None else width * channels * itemsize
    buf = array.array("B")
    buf.frombytes(data)
    msg.data = buf
    return msg


def pattern_image(width: int, height: int, channels: int = 3, dtype: Any = np.uint8) -> np.ndarray:
    """Two halves and a square, in (H, W[, C])."""
    top = 65535 if dtype == np.uint16 else 255
    img = np.zeros((height, width, channels), dtype=dtype)
    img[:, : width // 2] = int(top * 0.8)
    img[:, width // 2:] = int(top * 0.2)
    img[height // 3: 2 * height // 3, width // 3: 2 * width // 3] = int(top * 0.5)
    if channels >= 3:
        img[..., 1] //= 2
    return img[..., 0] if channels == 1 else img


def stamp_of(header: Any) -> tuple[int, int]:
    return header.stamp.sec, header.stamp.nanosec


def same_header(a: Any, b: Any) -> bool:
    return stamp_of(a) == stamp_of(b) and a.frame_id == b.frame_id


def image_array(msg: Any) -> np.ndarray:
    """Decode an output image (mono8, mono16, rgb8, 32SC1) written by the node."""
    dtype = {"mono8": np.uint8, "mono16": np.uint16, "rgb8": np.uint8, "32SC1": np.int32}[msg.encoding]
    arr = np.frombuffer(bytes(msg.data), dtype=np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<"))
    channels = 3 if msg.encoding == "rgb8" else 1
    assert msg.step == msg.width * channels * np.dtype(dtype).itemsize
    return arr.reshape((msg.height, msg.width, channels) if channels > 1 else (msg.height, msg.width))


def wait_for_diagnostic(client: "RosClient", node: Any, key: str, want: str, timeout: float = 10.0) -> dict[str, str]:
    """The key/values of ``node``'s /diagnostics status once ``key`` reads ``want`` (AssertionError after ``timeout``)."""
    from diagnostic_msgs.msg import DiagnosticArray

    col = client.subscribe("/diagnostics", DiagnosticArray)
    base = node.get_fully_qualified_name()
    values: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for msg in col.snapshot():
                for st in msg.status:
                    if st.name.startswith(base):
                        values = {kv.key: kv.value for kv in st.values}
            if values.get(key) == want:
                return values
            time.sleep(0.1)
    finally:
        client.unsubscribe(col)
    raise AssertionError(f"/diagnostics never had {key}={want}: {values}")
