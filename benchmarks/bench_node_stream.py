#!/usr/bin/env python3
"""Benchmark the real segment_node under camera streams over loopback DDS.

Starts the installed node, publishes ``--frames`` frames per camera at ``--rate`` Hz stamped with the publish
time, and reports per camera: processed fps, dropped frames, end-to-end latency (stamp -> labels received by
this client: mean/p50/p95/max), the node's own stage times (~/info, /diagnostics) and the node's RSS.

* ``--segmenter color_key`` (default): the model-free segmenter on a scene painted in its key colours, so the
  ROS layer alone is measured (labels, confidence, panoptic and info are all published and received here).
  ``--cost-ms`` adds a simulated model time. Any other segmenter runs the tiny random model (or ``--model``).
* ``--cameras N``: one node serving N cameras (one model); ``--separate`` runs N nodes of one camera each.

    source scripts/env.sh && python benchmarks/bench_node_stream.py --frames 600 --rate 30
    python benchmarks/bench_node_stream.py --segmenter dense_clip --frames 300       # the tiny model
    python benchmarks/bench_node_stream.py --cameras 4 [--separate]
    python benchmarks/bench_node_stream.py --rate 60 --transport shm   # the ceiling without UDP fragmentation

DDS settings (loopback profile, domain id) come from scripts/env.sh. Where frames go is read from the node's own
counters (/diagnostics): lost on the way in (never reached the node's callback), dropped by the node (stale,
newest kept), or processed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=600, help="frames to publish per camera (default 600)")
    p.add_argument("--rate", "--hz", type=float, default=30.0, help="camera rate, Hz")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--segmenter", default="color_key")
    p.add_argument("--preset", default="realtime")
    p.add_argument("--model", default="ovseg-tiny-vit", help="open_clip model (segmenters with a model)")
    p.add_argument("--checkpoint", type=Path, default=None, help="weights (default: random weights)")
    p.add_argument("--device", default="auto")
    p.add_argument("--options", default="", help="segmenter_options YAML")
    p.add_argument("--cost-ms", type=float, default=0.0, help="color_key: simulated model time per frame")
    p.add_argument("--cameras", type=int, default=1, help="cameras (default 1)")
    p.add_argument("--separate", action="store_true", help="one node per camera instead of one node for all")
    p.add_argument("--no-panoptic", action="store_true", help="publish_panoptic:=false")
    p.add_argument("--transport", choices=("udp", "shm"), default="udp",
                   help="DDS transport between this client and the node(s): udp = 127.0.0.1 only "
                        "(config/fastdds_loopback.xml, the default everywhere here); shm = plus Fast DDS shared "
                        "memory (config/fastdds_loopback_shm.xml), what processes on one robot use by default")
    p.add_argument("--workdir", type=Path, default=Path("log/bench_node_stream"))
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args()


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {k: float("nan") for k in ("mean", "p50", "p95", "max")}
    a = np.asarray(values)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "max": float(a.max())}


def node_params(args: argparse.Namespace, cameras: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {"segmenter": args.segmenter, "preset": args.preset, "device": args.device,
                              "cache_dir": "", "vocabulary_preset": "indoor_robot",
                              "publish_panoptic": not args.no_panoptic, "cameras": cameras,
                              "segmenter_options": args.options}
    if args.segmenter == "color_key":
        if args.cost_ms and not args.options:
            params["segmenter_options"] = f"{{cost_ms: {args.cost_ms}}}"
        return params
    ckpt = args.checkpoint
    if ckpt is None:
        from ovseg_ros.core.models import save_random_checkpoint

        ckpt = save_random_checkpoint(args.model, args.workdir / f"{args.model}-random.pt", seed=0)
    params.update(model=args.model, checkpoint=str(ckpt))
    return params


def main() -> int:
    args = parse_args()
    if args.transport == "shm":  # before rclpy starts; the node processes inherit it
        root = Path(__file__).resolve().parent.parent
        os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(root / "config" / "fastdds_loopback_shm.xml")
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image

    from ovseg_ros.msg import PanopticSegmentation, SegmentationInfo, Vocabulary
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the demo's client helpers
    from stream_client import NodeProcess, StreamClient, key_scene, rgb_image_msg, stamp_ns, synthetic_frame

    ns = f"/ovseg_bench_{os.getpid()}"
    names = [f"cam{i}" for i in range(args.cameras)] if args.cameras > 1 else [""]
    # (node process, camera name, input topic, output prefix) per camera
    nodes: list[Any] = []
    targets: list[tuple[Any, str, str, str]] = []
    if len(names) == 1:
        node = NodeProcess(ns, node_params(args, []), args.workdir)
        nodes.append(node)
        targets.append((node, "", f"{ns}/image", f"{node.fqn}/"))
    elif args.separate:  # N nodes, each in its camera's namespace, each with its own copy of the model
        for cam in names:
            node = NodeProcess(f"{ns}/{cam}", node_params(args, []), args.workdir / cam)
            nodes.append(node)
            targets.append((node, cam, f"{ns}/{cam}/image", f"{node.fqn}/"))
    else:  # one node, one model, N cameras
        node = NodeProcess(ns, node_params(args, names), args.workdir)
        nodes.append(node)
        targets = [(node, cam, f"{ns}/{cam}/image", f"{node.fqn}/{cam}/") for cam in names]

    rclpy.init()
    client = StreamClient("ovseg_bench_client")
    results: dict[str, Any] = {}
    try:
        for node in nodes:
            if client.record(f"{node.fqn}/vocabulary", Vocabulary, latched=True).wait(timeout=300) is None:
                print("node did not come up:\n" + node.output()[-3000:])
                return 1
        diagnostics = client.record("/diagnostics", DiagnosticArray, depth=1000)
        recs = []
        for _, cam, image_topic, out in targets:
            recs.append({
                "labels": client.record(f"{out}semantic/labels", Image, depth=1000),
                "confidence": client.record(f"{out}semantic/confidence", Image, depth=1000),
                "panoptic": client.record(f"{out}panoptic", PanopticSegmentation, depth=1000),
                "info": client.record(f"{out}info", SegmentationInfo, depth=1000),
                "pub": client.node.create_publisher(Image, image_topic, 5),
            })
        if args.segmenter == "color_key":
            frames = [key_scene(i, args.width, args.height) for i in range(64)]
        else:
            frames = [synthetic_frame(i, args.width, args.height) for i in range(64)]
        deadline = time.monotonic() + 120  # warm-up (discovery, first inference), not measured
        while not all(r["labels"].messages() for r in recs) and time.monotonic() < deadline:
            for r in recs:
                r["pub"].publish(rgb_image_msg(frames[0], client.node.get_clock().now().to_msg()))
            time.sleep(0.2)
        time.sleep(2.5)  # the warm-up frames are counted in the next /diagnostics (1 s period)
        counts_start = [node_counts(diagnostics, node.fqn, cam) for node, cam, _, _ in targets]
        rss_start = sum(n.rss_mib() for n in nodes)
        for r in recs:
            for key in ("labels", "confidence", "panoptic", "info"):
                r[key].items.clear()
        sent: list[set[int]] = [set() for _ in recs]
        period = 1.0 / args.rate
        t0 = time.monotonic()
        for i in range(args.frames):
            delay = t0 + i * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for c, r in enumerate(recs):
                stamp = client.node.get_clock().now().to_msg()
                sent[c].add(stamp.sec * 1_000_000_000 + stamp.nanosec)
                r["pub"].publish(rgb_image_msg(frames[i % len(frames)], stamp))
        duration = time.monotonic() - t0
        time.sleep(2.5)  # the frames in flight, and one more /diagnostics
        rss_end = sum(n.rss_mib() for n in nodes)
        per_camera = []
        for c, r in enumerate(recs):
            node, cam = targets[c][0], targets[c][1]
            end = node_counts(diagnostics, node.fqn, cam)
            received, processed, dropped_publish = (e - s for e, s in zip(end, counts_start[c]))
            status = node_status(diagnostics, node.fqn, cam)
            got = [(t, m) for t, m in list(r["labels"].items) if stamp_ns(m.header) in sent[c]]
            infos = [m for m in r["info"].messages() if stamp_ns(m.header) in sent[c]]
            complete = {stamp_ns(m.header) for m in r["panoptic"].messages()} & \
                {stamp_ns(m.header) for m in r["confidence"].messages()} & {stamp_ns(m.header) for _, m in got}
            dropped = sum(m.dropped_frames for m in infos)
            per_camera.append({
                "camera": targets[c][1] or "(default)",
                "processed": len(got),
                "processed_fps": len(got) / duration,
                "complete_outputs": len(complete & sent[c]),
                "dropped_by_node": dropped,
                "dropped_pct": 100.0 * max(0, args.frames - len(got)) / args.frames,
                "not_delivered_to_node": max(0, args.frames - len(got) - dropped),
                # where the frames went, from the node's own counters (/diagnostics)
                "received_by_node": received,
                "processed_by_node": processed,
                "lost_before_node": args.frames - received,
                "processed_but_not_received_here": processed - len(got),
                "results_dropped_in_publish_stage": dropped_publish,
                # mean of the node's last 100 frames per stage
                "stage_ms": {k[: -len("_ms_mean")]: float(v) for k, v in status.items()
                             if k.endswith("_ms_mean") and k != "latency_ms_mean" and v},
                "e2e_latency_ms": percentiles([(t - stamp_ns(m.header)) / 1e6 for t, m in got]),
                "inference_ms": percentiles([m.inference_ms for m in infos]),
            })
        results = {
            "frames_sent_per_camera": args.frames, "rate_hz": args.rate, "size": f"{args.width}x{args.height}",
            "duration_s": duration, "cameras": len(recs), "nodes": len(nodes),
            "segmenter": f"{args.segmenter}/{args.preset}" + (", no panoptic" if args.no_panoptic else ""),
            "transport": args.transport,
            "rss_mib_start": rss_start, "rss_mib_end": rss_end, "per_camera": per_camera,
        }
    finally:
        client.close()
        rclpy.try_shutdown()
        codes = [n.stop() for n in nodes]
    print_results(results)
    print(f"node exit code(s) {codes}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(c == 0 for c in codes) else 1


def node_status(diagnostics: Any, fqn: str, camera: str) -> dict[str, str]:
    """The key/values of ``camera`` in the node's latest /diagnostics."""
    for msg in reversed(diagnostics.messages()):
        for status in msg.status:
            if not status.name.startswith(f"{fqn}:"):
                continue
            kv = {v.key: v.value for v in status.values}
            if kv.get("camera") == (camera or "(default)") and "frames_received" in kv:
                return kv
    return {}


def node_counts(diagnostics: Any, fqn: str, camera: str) -> tuple[int, int, int]:
    """(frames received, processed, results dropped in the publish stage) of ``camera``."""
    kv = node_status(diagnostics, fqn, camera)
    return tuple(int(kv.get(k, 0)) for k in ("frames_received", "frames_processed",  # type: ignore[return-value]
                                               "results_dropped_in_publish_stage"))


def print_results(r: dict) -> None:
    def lat(d: dict) -> str:
        return f"mean {d['mean']:.1f}  p50 {d['p50']:.1f}  p95 {d['p95']:.1f}  max {d['max']:.1f} ms"

    print(f"segment_node stream benchmark: {r['segmenter']}, {r['cameras']} camera(s) on {r['nodes']} node(s), "
          f"DDS transport {r['transport']}")
    print(f"  stream          {r['frames_sent_per_camera']} frames per camera, {r['size']} rgb8 at "
          f"{r['rate_hz']:g} Hz ({r['duration_s']:.1f} s)")
    for c in r["per_camera"]:
        print(f"  [{c['camera']}] processed {c['processed']} = {c['processed_fps']:.2f} fps "
              f"({c['dropped_pct']:.1f} % not processed; {c['dropped_by_node']} dropped by the node, "
              f"{c['not_delivered_to_node']} never delivered); all four outputs for {c['complete_outputs']}")
        print(f"      node counters: received {c['received_by_node']} ({c['lost_before_node']} lost on the way in), "
              f"processed {c['processed_by_node']} ({c['processed_but_not_received_here']} processed but not "
              f"received by this client), {c['results_dropped_in_publish_stage']} results replaced before the "
              f"publish stage took them")
        stages = ", ".join(f"{k} {v:.1f}" for k, v in c["stage_ms"].items())
        print(f"      node stage means (last 100 frames): {stages} ms")
        print(f"      e2e latency {lat(c['e2e_latency_ms'])}")
        print(f"      inference   {lat(c['inference_ms'])}")
    print(f"  node RSS        {r['rss_mib_start']:.0f} MiB at start, {r['rss_mib_end']:.0f} MiB after the run "
          f"(all nodes)")


if __name__ == "__main__":
    sys.exit(main())
