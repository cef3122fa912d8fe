"""Client-side helpers for the demo and the benchmarks: a synthetic camera, a spinning client node that
records outputs with their arrival time, and the installed ``segment_node`` as a child process.

Not part of the node package (ovseg_ros): it lives beside the demo (scripts/demo_stream.py) and is imported by
the benchmarks (benchmarks/bench_node_stream.py) and the ROS tests (tests/ros/ros_harness.py), which put this
folder on ``sys.path``. DDS settings (loopback profile, domain) come from the environment
(``source scripts/env.sh``), never from here.
"""

from __future__ import annotations

import array
import os
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import yaml


def synthetic_frame(i: int, width: int = 640, height: int = 480) -> np.ndarray:
    """(H, W, 3) uint8 RGB: a floor/wall gradient with two moving boxes (frame ``i``)."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (90 + 60 * y).astype(np.uint8)
    img[..., 1] = (110 + 40 * y).astype(np.uint8)
    img[..., 2] = (140 - 40 * y).astype(np.uint8)
    bw, bh = width // 6, height // 4
    x0 = int((width - bw) * (0.5 + 0.45 * np.sin(i / 15.0)))
    img[height // 2: height // 2 + bh, x0: x0 + bw] = (200, 60, 40)
    x1 = int((width - bw) * (0.5 + 0.45 * np.cos(i / 23.0)))
    img[height // 5: height // 5 + bh, x1: x1 + bw // 2] = (40, 160, 70)
    return img


def key_scene(i: int, width: int = 640, height: int = 480, n_classes: int = 20, boxes: int = 24) -> np.ndarray:
    """(H, W, 3) uint8 RGB painted in the ``color_key`` segmenter's key colours: a realistic label map.

    Floor, wall and ceiling bands (classes 0-2) and ``boxes`` rectangles of the other classes moving with
    frame ``i`` (tens of segments, several instances per thing class), so the node's per-frame work
    (label encoding, panoptic derivation, messages) is what a real scene costs, at no model cost.
    """
    from ovseg_ros.core.segmenters.color_key import key_colors

    keys = key_colors(n_classes)
    img = np.empty((height, width, 3), np.uint8)
    img[: height // 5] = keys[2 % n_classes]
    img[height // 5: height // 2] = keys[1 % n_classes]
    img[height // 2:] = keys[0]
    rng = np.random.default_rng(1234)
    sizes = rng.uniform(0.04, 0.16, (boxes, 2))
    phase = rng.uniform(0, 2 * np.pi, (boxes, 2))
    for b in range(boxes):
        bw, bh = max(2, int(width * sizes[b, 0])), max(2, int(height * sizes[b, 1]))
        x = int((width - bw) * (0.5 + 0.45 * np.sin(i / 20.0 + phase[b, 0])))
        y = int((height - bh) * (0.5 + 0.45 * np.cos(i / 31.0 + phase[b, 1])))
        img[y: y + bh, x: x + bw] = keys[3 + b % max(1, n_classes - 3)] if n_classes > 3 else keys[0]
    return img


def rgb_image_msg(rgb: np.ndarray, stamp: Any, frame_id: str = "demo_camera") -> Any:
    from sensor_msgs.msg import Image

    msg = Image()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = rgb.shape[:2]
    msg.encoding = "rgb8"
    msg.step = rgb.shape[1] * 3
    data = array.array("B")
    data.frombytes(np.ascontiguousarray(rgb).reshape(-1).data)
    msg.data = data
    return msg


def stamp_ns(header: Any) -> int:
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


def serialized_frame(rgb: np.ndarray, frame_id: str = "demo_camera") -> bytes:
    """A CDR-serialised rgb8 sensor_msgs/Image of ``rgb`` with a zero stamp (see :func:`with_stamp`)."""
    from rclpy.serialization import serialize_message
    from builtin_interfaces.msg import Time

    return serialize_message(rgb_image_msg(rgb, Time(), frame_id))


#: Every message recorded or published raw here starts with a std_msgs/Header: after the 4-byte CDR
#: encapsulation header come int32 sec and uint32 nanosec (little-endian: rclpy serialises CDR_LE).
_STAMP = struct.Struct("<iI")


def with_stamp(serialized: bytes, sec: int, nanosec: int) -> bytes:
    """``serialized`` (from :func:`serialized_frame`) with its header stamp set, without deserialising."""
    if serialized[:2] != b"\x00\x01":
        raise ValueError("not a little-endian CDR message")
    return serialized[:4] + _STAMP.pack(sec, nanosec) + serialized[12:]


def raw_stamp_ns(serialized: bytes) -> int:
    """The header stamp (ns) of a serialised message whose first field is a std_msgs/Header."""
    sec, nanosec = _STAMP.unpack_from(serialized, 4)
    return sec * 1_000_000_000 + nanosec


class StampRecorder:
    """Raw subscription callback keeping (arrival ns on the ROS clock, header stamp ns) and nothing else.

    Messages are never deserialised (``raw=True``): a client that deserialises 1-4 MB of outputs per frame in
    Python falls behind at 30 Hz and drops messages itself, which a benchmark would then charge to the node.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.items: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        item = (self.clock.now().nanoseconds, raw_stamp_ns(data))
        with self.lock:
            self.items.append(item)

    def stamps(self) -> dict[int, int]:
        """Header stamp -> arrival time (ns)."""
        with self.lock:
            return {s: t for t, s in self.items}

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


def process_cpu_s(pid: int) -> float:
    """User + system CPU time (s) of process ``pid`` so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU time (s) per thread name of process ``pid`` (threads of one name summed; Linux /proc)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        name = text[text.index("(") + 1: text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


class Recorder:
    """Subscription callback keeping (arrival time in ns on the ROS clock, message)."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.items: list[tuple[int, Any]] = []
        self.lock = threading.Lock()
        self.event = threading.Event()

    def __call__(self, msg: Any) -> None:
        with self.lock:
            self.items.append((self.clock.now().nanoseconds, msg))
        self.event.set()

    def messages(self) -> list[Any]:
        with self.lock:
            return [m for _, m in self.items]

    def wait(self, predicate: Callable[[Any], bool] = lambda m: True, timeout: float = 30.0) -> Optional[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages():
                if predicate(m):
                    return m
            self.event.wait(0.1)
            self.event.clear()
        return None


class StreamClient:
    """An rclpy node spinning in a background thread (rclpy must be initialised by the caller)."""

    def __init__(self, name: str) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.node = rclpy.create_node(name)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # noqa: BLE001  (context shut down while spinning)
            pass

    def record(self, topic: str, msg_type: type, latched: bool = False, depth: int = 100) -> Recorder:
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

        qos = QoSProfile(depth=1 if latched else depth, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
        rec = Recorder(self.node.get_clock())
        self.node.create_subscription(msg_type, topic, rec, qos)
        return rec

    def record_stamps(self, topic: str, msg_type: type, depth: int = 100) -> StampRecorder:
        """Like :meth:`record` (volatile, reliable) but raw: only arrival times and header stamps are kept."""
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        rec = StampRecorder(self.node.get_clock())
        self.node.create_subscription(msg_type, topic, rec, QoSProfile(depth=depth,
                                      reliability=ReliabilityPolicy.RELIABLE), raw=True)
        return rec

    def call(self, srv_type: type, name: str, request: Any, timeout: float = 60.0) -> Any:
        client = self.node.create_client(srv_type, name)
        try:
            if not client.wait_for_service(timeout_sec=timeout):
                raise TimeoutError(f"service {name} not available")
            future = client.call_async(request)
            done = threading.Event()
            future.add_done_callback(lambda _f: done.set())
            if not done.wait(timeout):
                raise TimeoutError(f"service {name} did not answer within {timeout} s")
            return future.result()
        finally:
            self.node.destroy_client(client)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()


def node_executable() -> Path:
    from ament_index_python.packages import get_package_prefix

    return Path(get_package_prefix("ovseg_ros")) / "lib" / "ovseg_ros" / "segment_node"


class NodeProcess:
    """The installed segment_node as a child process; parameters go through a YAML file (``/**``)."""

    def __init__(
        self, namespace: str, params: dict[str, Any], workdir: Path, name: str = "segment_node", echo: bool = False
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.fqn = f"{namespace.rstrip('/')}/{name}"
        params_file = workdir / f"{name}_params.yaml"
        params_file.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop())
        cmd = [str(node_executable()), "--ros-args", "-r", f"__ns:={namespace}", "-r", f"__node:={name}",
               "--params-file", str(params_file)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=None if echo else self._log,
                                     stderr=None if echo else subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 60.0) -> bool:
        """True once ``text`` appears in the node's output (False on timeout or exit without it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return True
            if self.proc.poll() is not None:
                return text in self.output()
            time.sleep(0.1)
        return False

    def rss_mib(self) -> float:
        """Resident memory of the node process (Linux /proc), MiB."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        return float("nan")

    def stop(self, timeout: float = 20.0) -> Optional[int]:
        """SIGINT (what Ctrl-C and launch send), wait, kill as a last resort; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode
