#!/usr/bin/env python3
"""Benchmark the real segment_node under a camera stream over loopback DDS.

Starts the installed node (default: the tiny random-weight ``ovseg-tiny-vit`` with dense_clip's realtime
preset, slow enough on a CPU that frames must be dropped), publishes ``--frames`` synthetic frames at
``--rate`` Hz stamped with the publish time, and reports processed fps, dropped frames, end-to-end latency
(stamp -> labels received by this client: mean/p50/p95/max) and the node's RSS before and after.

    source scripts/env.sh && python benchmarks/bench_node_stream.py --frames 300

DDS settings (loopback profile, domain id) come from scripts/env.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=1000, help="frames to publish (default 1000)")
    p.add_argument("--rate", type=float, default=30.0, help="camera rate, Hz")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--segmenter", default="dense_clip")
    p.add_argument("--preset", default="realtime")
    p.add_argument("--model", default="ovseg-tiny-vit")
    p.add_argument("--checkpoint", type=Path, default=None, help="weights (default: random tiny weights)")
    p.add_argument("--device", default="auto")
    p.add_argument("--options", default="", help="segmenter_options YAML")
    p.add_argument("--no-panoptic", action="store_true", help="publish_panoptic:=false")
    p.add_argument("--workdir", type=Path, default=Path("log/bench_node_stream"))
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args()


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {k: float("nan") for k in ("mean", "p50", "p95", "max")}
    a = np.asarray(values)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "max": float(a.max())}


def main() -> int:
    args = parse_args()
    import rclpy
    from sensor_msgs.msg import Image

    from ovseg_ros.msg import SegmentationInfo, Vocabulary
    from ovseg_ros.ros.stream_client import NodeProcess, StreamClient, rgb_image_msg, stamp_ns, synthetic_frame

    ckpt = args.checkpoint
    if ckpt is None:
        from ovseg_ros.core.models import save_random_checkpoint

        ckpt = save_random_checkpoint(args.model, args.workdir / f"{args.model}-random.pt", seed=0)
    ns = f"/ovseg_bench_{os.getpid()}"
    params = {"segmenter": args.segmenter, "preset": args.preset, "model": args.model, "checkpoint": str(ckpt),
              "device": args.device, "cache_dir": "", "vocabulary_preset": "indoor_robot",
              "segmenter_options": args.options, "publish_panoptic": not args.no_panoptic}
    node = NodeProcess(ns, params, args.workdir)
    rclpy.init()
    client = StreamClient("ovseg_bench_client")
    fqn = node.fqn
    try:
        if client.record(f"{fqn}/vocabulary", Vocabulary, latched=True).wait(timeout=300) is None:
            print("node did not come up:\n" + node.log_path.read_text()[-3000:])
            return 1
        labels = client.record(f"{fqn}/semantic/labels", Image, depth=1000)
        info = client.record(f"{fqn}/info", SegmentationInfo, depth=1000)
        pub = client.node.create_publisher(Image, f"{ns}/image", 5)
        frames = [synthetic_frame(i, args.width, args.height) for i in range(64)]  # prepared: keep pacing exact
        # warm-up (discovery, first inference), not measured
        deadline = time.monotonic() + 120
        while not labels.messages() and time.monotonic() < deadline:
            pub.publish(rgb_image_msg(frames[0], client.node.get_clock().now().to_msg()))
            time.sleep(0.2)
        time.sleep(1.0)
        rss_start = node.rss_mib()
        labels.items.clear()
        info.items.clear()

        sent: set[int] = set()
        period = 1.0 / args.rate
        t0 = time.monotonic()
        for i in range(args.frames):
            target = t0 + i * period
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            stamp = client.node.get_clock().now().to_msg()
            sent.add(stamp.sec * 1_000_000_000 + stamp.nanosec)
            pub.publish(rgb_image_msg(frames[i % len(frames)], stamp))
        duration = time.monotonic() - t0
        time.sleep(2.0)  # the in-flight frame
        rss_end = node.rss_mib()

        got = [(t, m) for t, m in list(labels.items) if stamp_ns(m.header) in sent]
        infos = [m for m in info.messages() if stamp_ns(m.header) in sent]
        e2e = [(t - stamp_ns(m.header)) / 1e6 for t, m in got]
        dropped_node = sum(m.dropped_frames for m in infos)
        results = {
            "frames_sent": args.frames,
            "rate_hz": args.rate,
            "size": f"{args.width}x{args.height}",
            "duration_s": duration,
            "processed": len(got),
            "processed_fps": len(got) / duration,
            "dropped_by_node": dropped_node,
            "not_delivered_to_node": max(0, args.frames - len(got) - dropped_node),
            "e2e_latency_ms": percentiles(e2e),
            "node_latency_ms": percentiles([m.latency_ms for m in infos]),
            "inference_ms": percentiles([m.inference_ms for m in infos]),
            "rss_mib_start": rss_start,
            "rss_mib_end": rss_end,
            "segmenter": f"{args.segmenter}/{args.preset}" + (", no panoptic" if args.no_panoptic else ""),
            "model": f"{args.model} ({'random' if args.checkpoint is None else ckpt})",
        }
    finally:
        client.close()
        rclpy.try_shutdown()
        code = node.stop()
    print_results(results)
    print(f"node exit code {code}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if code == 0 else 1


def print_results(r: dict) -> None:
    def lat(d: dict) -> str:
        return f"mean {d['mean']:.0f}  p50 {d['p50']:.0f}  p95 {d['p95']:.0f}  max {d['max']:.0f} ms"

    print(f"segment_node stream benchmark: {r['segmenter']}, {r['model']}")
    print(f"  stream          {r['frames_sent']} frames {r['size']} rgb8 at {r['rate_hz']:g} Hz "
          f"({r['duration_s']:.1f} s)")
    print(f"  processed       {r['processed']} frames = {r['processed_fps']:.2f} fps")
    print(f"  dropped         {r['dropped_by_node']} by the node (stale, counted), "
          f"{r['not_delivered_to_node']} never delivered (best-effort DDS, depth 1)")
    print(f"  e2e latency     {lat(r['e2e_latency_ms'])}  (stamp -> labels at this client)")
    print(f"  node latency    {lat(r['node_latency_ms'])}  (~/info)")
    print(f"  inference       {lat(r['inference_ms'])}")
    print(f"  node RSS        {r['rss_mib_start']:.0f} MiB at start, {r['rss_mib_end']:.0f} MiB after the run")


if __name__ == "__main__":
    sys.exit(main())
