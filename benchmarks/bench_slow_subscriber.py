"""Does a reliable subscriber that stops reading hold up segment_node's publishing (and so its output gate)?

    source scripts/env.sh && python benchmarks/bench_slow_subscriber.py              # 640x480 cloud with rgb
    python benchmarks/bench_slow_subscriber.py --frames 100 --width 1280 --height 720

The node publishes under its output gate's lock (ovseg_ros/ros/gate.py), so a publish that waited for a reader
would hold every output and every vocabulary swap. This measures ``publish()`` of a PointCloud2 of the node's
size (x y z confidence rgb + label: 20 bytes a point, ~6 MB at 640x480) with the node's output QoS
(:func:`ovseg_ros.ros.qos.output_qos`: reliable, KEEP_LAST 2) in three cases: no other reader; a reliable
KEEP_LAST reader process frozen with SIGSTOP (it stops reading *and* acknowledging); the same with a KEEP_ALL
reader. A healthy reliable reader counts what still arrives. Loopback DDS only (scripts/env.sh).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np

READER = textwrap.dedent("""
    import sys, rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy, HistoryPolicy, DurabilityPolicy
    from sensor_msgs.msg import PointCloud2
    rclpy.init()
    n = rclpy.create_node("frozen_reader")
    hist = HistoryPolicy.KEEP_ALL if sys.argv[2] == "keep_all" else HistoryPolicy.KEEP_LAST
    q = QoSProfile(history=hist, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                   durability=DurabilityPolicy.VOLATILE)
    seen = []
    def cb(m):
        if not seen:
            print("got", flush=True)
        seen.append(1)
    n.create_subscription(PointCloud2, sys.argv[1], cb, q)
    rclpy.spin(n)
""")


def measure(mode: str, frames: int, width: int, height: int, hz: float) -> dict:
    """Publish ``frames`` clouds at ``hz`` with a frozen reader of kind ``mode`` (none/keep_last/keep_all)."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2, PointField

    from ovseg_ros.ros.qos import output_qos

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    topic = f"/bench_frozen_reader_{os.getpid()}_{mode}"
    pub_node = rclpy.create_node("bench_writer", context=ctx)
    pub = pub_node.create_publisher(PointCloud2, topic, output_qos())
    healthy = rclpy.create_node("bench_healthy_reader", context=ctx)
    got = [0]
    healthy.create_subscription(PointCloud2, topic, lambda m: got.__setitem__(0, got[0] + 1),
                                QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE))
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(healthy)
    threading.Thread(target=ex.spin, daemon=True).start()
    msg = PointCloud2()
    msg.height, msg.width = height, width
    msg.fields = [PointField(name=n, offset=4 * i, datatype=7, count=1)
                  for i, n in enumerate(("x", "y", "z", "confidence", "rgb"))]
    msg.point_step, msg.row_step = 20, 20 * width
    msg.data = np.zeros(height * width * 20, np.uint8).tobytes()
    proc = None
    ready = threading.Event()
    if mode != "none":
        proc = subprocess.Popen([sys.executable, "-c", READER, topic, mode], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=lambda: (proc.stdout.readline(), ready.set()), daemon=True).start()
    else:
        ready.set()
    try:
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and not (ready.is_set() and got[0] > 3):
            pub.publish(msg)
            time.sleep(1.0 / hz)
        if not ready.is_set():
            raise RuntimeError("the reader process never received a cloud")
        if proc is not None:
            os.kill(proc.pid, signal.SIGSTOP)  # stops reading and acknowledging
        got[0] = 0
        times = []
        for _ in range(frames):
            t0 = time.perf_counter()
            pub.publish(msg)
            times.append(time.perf_counter() - t0)
            time.sleep(max(0.0, 1.0 / hz - times[-1]))
        time.sleep(0.5)
        return {"mode": mode, "bytes": len(msg.data), "median_ms": 1e3 * float(np.median(times)),
                "max_ms": 1e3 * max(times), "healthy_received": got[0], "frames": frames}
    finally:
        if proc is not None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        ex.shutdown(timeout_sec=1.0)
        rclpy.try_shutdown(context=ctx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--hz", type=float, default=10.0)
    args = ap.parse_args()
    for mode in ("none", "keep_last", "keep_all"):
        r = measure(mode, args.frames, args.width, args.height, args.hz)
        print(f"frozen reader {r['mode']:9s}: {r['bytes'] / 1e6:.1f} MB cloud, publish median {r['median_ms']:.1f} ms, "
              f"max {r['max_ms']:.1f} ms; healthy reader received {r['healthy_received']}/{r['frames']}")
    os._exit(0)  # rclpy's teardown of the daemon executor thread is not worth waiting for


if __name__ == "__main__":
    main()
