#!/usr/bin/env python3
"""Can rclpy's EventsExecutor (rclpy.experimental, rclpy 9.1 here) spin segment_node? A reproduction.

Spins a ``color_key`` SegmentNode in this process on ``--executor`` (events | multi_threaded), publishes
``--frames`` camera frames from a child process (another DDS participant, as a camera driver is) and prints how
many reached the node's image callback. Measured here (docs/benchmarks.md): multi_threaded 98 of 100,
events 0 of 100 while the node's process kept spinning at 20-28 % of a core.

    source scripts/env.sh && python benchmarks/probe_events_executor.py --executor events
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAMERA = """
import sys, time, rclpy
sys.path[:0] = [{tests!r}, {scripts!r}]
from sensor_msgs.msg import Image
from test_ros_pipeline import painted
rclpy.init(); node = rclpy.create_node("probe_camera"); pub = node.create_publisher(Image, "/probe/image", 10)
time.sleep(2.0)
for _ in range({frames}):
    pub.publish(painted(1, "cam")); time.sleep(1 / 15)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--executor", choices=("events", "multi_threaded"), default="events")
    p.add_argument("--frames", type=int, default=100)
    args = p.parse_args()
    sys.path[:0] = [str(ROOT / "tests" / "ros"), str(ROOT / "scripts")]
    import rclpy
    from rclpy.parameter import Parameter

    from ovseg_ros.ros.segment_node import SegmentNode

    rclpy.init()
    params = {"segmenter": "color_key", "cache_dir": "", "vocabulary": ["floor", "wall", "door"]}
    node = SegmentNode(namespace="/probe", parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    node.trigger_configure()
    node.trigger_activate()
    if args.executor == "events":
        from rclpy.experimental import EventsExecutor

        executor = EventsExecutor()
    else:
        from rclpy.executors import MultiThreadedExecutor

        executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    calls: list[float] = []
    for sub in node.subscriptions:
        if sub.topic_name.endswith("/image"):
            inner = sub.callback
            sub.callback = lambda msg, inner=inner: (calls.append(time.monotonic()), inner(msg))
    threading.Thread(target=executor.spin, daemon=True).start()
    camera = subprocess.run([sys.executable, "-c", CAMERA.format(
        tests=str(ROOT / "tests" / "ros"), scripts=str(ROOT / "scripts"), frames=args.frames)], timeout=300)
    time.sleep(2.0)
    cpu = time.process_time()
    print(f"{args.executor}: {len(calls)} of {args.frames} frames reached the image callback "
          f"(camera exit {camera.returncode}; this process used {cpu:.1f} s CPU), errors {node.errors.snapshot()}")
    sys.stdout.flush()
    os._exit(0 if calls else 1)


if __name__ == "__main__":
    sys.exit(main())
