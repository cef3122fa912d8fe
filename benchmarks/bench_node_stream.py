#!/usr/bin/env python3
"""Benchmark the real segment_node under camera streams over loopback DDS.

Starts the installed node, publishes ``--frames`` frames per camera at ``--rate`` Hz stamped with the publish
time, and reports per camera: processed fps, where frames were lost, end-to-end latency (stamp -> labels received
by this client: mean/p50/p95/max), the node's own stage times (/diagnostics), and per node the **CPU time per
frame** (user + system time of the node process over the measured window, /proc/<pid>/stat, divided by the
frames it processed), split by thread, the node's RSS and the machine's load (/proc/loadavg) before and after.
CPU time per frame, unlike fps, survives a machine loaded by other work; compare configurations by ratios
measured in one run.

The client itself must not lose frames: it publishes pre-serialised images (only the stamp bytes change) and
subscribes to the outputs with ``raw=True``, reading only the header stamp from the CDR bytes (deserialising
1-4 MB of outputs per frame in Python made an earlier client drop tens of frames before they reached the node).

* ``--segmenter color_key`` (default): the model-free segmenter on a scene painted in its key colours, so the
  ROS layer alone is measured (labels, confidence, panoptic and info are all published and received here).
  ``--cost-ms`` adds a simulated model time. Any other segmenter runs the tiny random model (or ``--model``).
* ``--cameras N``: one node serving N cameras (one model); ``--separate`` runs N nodes of one camera each;
  ``--compare`` runs both, one after the other in one invocation, and prints their ratios.

    source scripts/env.sh && python benchmarks/bench_node_stream.py --frames 600 --rate 30
    python benchmarks/bench_node_stream.py --segmenter dense_clip --frames 300       # the tiny model
    python benchmarks/bench_node_stream.py --cameras 4 [--separate | --compare]
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
from typing import Any, Optional

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
    p.add_argument("--compare", action="store_true",
                   help="with --cameras N: one node with N cameras, then N nodes, in one run; prints the ratios")
    p.add_argument("--ab-env", default="",
                   help="KEY=VALUE[,KEY=VALUE]: run the same layout twice in one invocation, the second time with "
                        "this environment in the node(s), and print the ratios (e.g. "
                        "PYTHONPATH=<another install>/lib/python3.11/site-packages compares code versions)")
    p.add_argument("--node-params", default="", help="extra node parameters, YAML mapping (e.g. '{executor: events}')")
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
    if args.node_params:
        import yaml

        params.update(yaml.safe_load(args.node_params) or {})
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

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the demo's client helpers
    from stream_client import StreamClient

    if args.compare and args.ab_env:
        print("--compare and --ab-env are exclusive")
        return 2
    pairs = [kv.split("=", 1) for kv in args.ab_env.split(",") if kv]
    if any(len(kv) != 2 or not kv[0] for kv in pairs):
        print(f"--ab-env wants KEY=VALUE[,KEY=VALUE], got {args.ab_env!r}")
        return 2
    ab_env = dict(pairs)
    # (separate, extra node environment) per run
    layouts: list[tuple[bool, dict[str, str]]] = (
        [(False, {}), (True, {})] if args.compare else
        [(args.separate, {}), (args.separate, ab_env)] if ab_env else [(args.separate, {})])
    rclpy.init()
    client = StreamClient("ovseg_bench_client")
    runs: list[dict[str, Any]] = []
    codes: list[Optional[int]] = []
    try:
        for separate, env in layouts:
            result, run_codes = run_once(args, client, separate and args.cameras > 1, len(runs), env)
            codes += run_codes
            if not result:
                return 1
            print_results(result)
            print(f"node exit code(s) {run_codes}")
            runs.append(result)
    finally:
        client.close()
        rclpy.try_shutdown()
    out: dict[str, Any] = runs[0] if len(runs) == 1 else {"runs": runs, "ratios": compare(runs[0], runs[1])}
    if len(runs) == 2:
        print_ratios(out["ratios"], f"node environment {args.ab_env} / as is" if ab_env else
                     f"one node with {args.cameras} cameras / {args.cameras} nodes")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0 if all(c == 0 for c in codes) else 1


def run_once(args: argparse.Namespace, client: Any, separate: bool, index: int,
             env: dict[str, str]) -> tuple[dict[str, Any], list]:
    """One stream through one layout (one node with all cameras, or one node per camera); (results, exit codes)."""
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image

    from ovseg_ros.msg import PanopticSegmentation, SegmentationInfo, Vocabulary
    from stream_client import (
        NodeProcess, key_scene, process_cpu_s, serialized_frame, synthetic_frame, thread_cpu_s, with_stamp,
    )

    ns = f"/ovseg_bench_{os.getpid()}_{index}"
    names = [f"cam{i}" for i in range(args.cameras)] if args.cameras > 1 else [""]
    workdir = args.workdir / ("separate" if separate else "shared") / str(index)
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the node processes started below
    # (node process, camera name, input topic, output prefix) per camera; a separate node serves its camera as
    # its default camera (that is the name in its /diagnostics)
    nodes: list[Any] = []
    targets: list[tuple[Any, str, str, str]] = []
    if len(names) == 1:
        node = NodeProcess(ns, node_params(args, []), workdir)
        nodes.append(node)
        targets.append((node, "", f"{ns}/image", f"{node.fqn}/"))
    elif separate:  # N nodes, each in its camera's namespace, each with its own copy of the model
        for cam in names:
            node = NodeProcess(f"{ns}/{cam}", node_params(args, []), workdir / cam)
            nodes.append(node)
            targets.append((node, cam, f"{ns}/{cam}/image", f"{node.fqn}/"))
    else:  # one node, one model, N cameras
        node = NodeProcess(ns, node_params(args, names), workdir)
        nodes.append(node)
        targets = [(node, cam, f"{ns}/{cam}/image", f"{node.fqn}/{cam}/") for cam in names]
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    results: dict[str, Any] = {}
    try:
        for node in nodes:
            if client.record(f"{node.fqn}/vocabulary", Vocabulary, latched=True).wait(timeout=300) is None:
                print("node did not come up:\n" + node.output()[-3000:])
                return {}, [n.stop() for n in nodes]
        diagnostics = client.record("/diagnostics", DiagnosticArray, depth=1000)
        recs = []
        for _, cam, image_topic, out in targets:
            recs.append({
                "labels": client.record_stamps(f"{out}semantic/labels", Image, depth=1000),
                "confidence": client.record_stamps(f"{out}semantic/confidence", Image, depth=1000),
                "panoptic": client.record_stamps(f"{out}panoptic", PanopticSegmentation, depth=1000),
                "info": client.record_stamps(f"{out}info", SegmentationInfo, depth=1000),
                "pub": client.node.create_publisher(Image, image_topic, 5),
            })
        scene = key_scene if args.segmenter == "color_key" else synthetic_frame
        frames = [serialized_frame(scene(i, args.width, args.height)) for i in range(64)]
        clock = client.node.get_clock()

        def publish(r: dict, frame: bytes) -> int:
            now = clock.now().nanoseconds
            r["pub"].publish(with_stamp(frame, now // 1_000_000_000, now % 1_000_000_000))
            return now

        deadline = time.monotonic() + 300  # warm-up (discovery, first inference), not measured
        while not all(r["labels"].items for r in recs) and time.monotonic() < deadline:
            for r in recs:
                publish(r, frames[0])
            time.sleep(0.2)
        time.sleep(2.5)  # the warm-up frames are counted in the next /diagnostics (1 s period)
        diag_cam = [("" if separate else cam) for _, cam, _, _ in targets]
        counts_start = [node_counts(diagnostics, node.fqn, d) for (node, _, _, _), d in zip(targets, diag_cam)]
        rss_start = sum(n.rss_mib() for n in nodes)
        for r in recs:
            for key in ("labels", "confidence", "panoptic", "info"):
                r[key].clear()
        sent: list[set[int]] = [set() for _ in recs]
        period = 1.0 / args.rate
        load_start = Path("/proc/loadavg").read_text().split()[:3]
        cpu_start = [process_cpu_s(n.pid) for n in nodes]
        threads_start = [thread_cpu_s(n.pid) for n in nodes]
        client_cpu_start = time.process_time()
        t0 = time.monotonic()
        for i in range(args.frames):
            delay = t0 + i * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for c, r in enumerate(recs):
                sent[c].add(publish(r, frames[i % len(frames)]))
        duration = time.monotonic() - t0
        time.sleep(1.0)  # the frames in flight (CPU is counted up to here: their work belongs to the window)
        cpu_s = [process_cpu_s(n.pid) - s for n, s in zip(nodes, cpu_start)]
        threads = [thread_delta(thread_cpu_s(n.pid), s) for n, s in zip(nodes, threads_start)]
        client_cpu_s = time.process_time() - client_cpu_start
        window = time.monotonic() - t0
        load_end = Path("/proc/loadavg").read_text().split()[:3]
        time.sleep(1.5)  # one more /diagnostics
        rss_end = sum(n.rss_mib() for n in nodes)
        per_camera = []
        for c, r in enumerate(recs):
            node, cam = targets[c][0], diag_cam[c]
            end = node_counts(diagnostics, node.fqn, cam)
            received, processed, dropped_publish = (e - s for e, s in zip(end, counts_start[c]))
            status = node_status(diagnostics, node.fqn, cam)
            got = {s: t for s, t in r["labels"].stamps().items() if s in sent[c]}
            complete = set(got) & set(r["panoptic"].stamps()) & set(r["confidence"].stamps()) & \
                set(r["info"].stamps())
            per_camera.append({
                "camera": targets[c][1] or "(default)",
                "processed": len(got),
                "processed_fps": len(got) / duration,
                "complete_outputs": len(complete),
                "dropped_pct": 100.0 * max(0, args.frames - len(got)) / args.frames,
                # where the frames went, from the node's own counters (/diagnostics)
                "received_by_node": received,
                "processed_by_node": processed,
                "lost_before_node": args.frames - received,
                "dropped_by_node": received - processed,
                "processed_but_not_received_here": processed - len(got),
                "results_dropped_in_publish_stage": dropped_publish,
                # mean of the node's last 100 frames per stage
                "stage_ms": {k[: -len("_ms_mean")]: float(v) for k, v in status.items()
                             if k.endswith("_ms_mean") and k != "latency_ms_mean" and v},
                "e2e_latency_ms": percentiles([(t - s) / 1e6 for s, t in got.items()]),
            })
        processed_total = sum(c["processed_by_node"] for c in per_camera)
        results = {
            "layout": f"{len(nodes)} node(s), {len(recs)} camera(s)",
            "frames_sent_per_camera": args.frames, "rate_hz": args.rate, "size": f"{args.width}x{args.height}",
            "duration_s": duration, "cameras": len(recs), "nodes": len(nodes),
            "segmenter": f"{args.segmenter}/{args.preset}" + (", no panoptic" if args.no_panoptic else ""),
            "node_params": args.node_params, "node_env": env, "transport": args.transport,
            "loadavg_start": " ".join(load_start), "loadavg_end": " ".join(load_end),
            "processed_fps_total": sum(c["processed"] for c in per_camera) / duration,
            "node_cpu_s": sum(cpu_s), "node_cpu_pct": 100.0 * sum(cpu_s) / window,
            "node_cpu_ms_per_frame": 1e3 * sum(cpu_s) / max(1, processed_total),
            # every received frame costs a take and a conversion, processed or not
            "node_cpu_ms_per_received_frame": 1e3 * sum(cpu_s) / max(1, sum(c["received_by_node"] for c in per_camera)),
            "node_thread_cpu_ms_per_frame": {
                k: 1e3 * v / max(1, processed_total) for k, v in sorted(
                    merge_threads(threads).items(), key=lambda kv: -kv[1]) if v > 0},
            "client_cpu_pct": 100.0 * client_cpu_s / window,
            "rss_mib_start": rss_start, "rss_mib_end": rss_end, "per_camera": per_camera,
        }
    finally:
        codes = [n.stop() for n in nodes]
    return results, codes


def thread_delta(end: dict[str, float], start: dict[str, float]) -> dict[str, float]:
    return {k: v - start.get(k, 0.0) for k, v in end.items()}


def merge_threads(per_node: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for threads in per_node:
        for k, v in threads.items():
            out[k] = out.get(k, 0.0) + v
    return out


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Same-run ratios of the first run to the second (--compare: one node with N cameras / N nodes, so fps
    above 1 and CPU per frame below 1 favour one node; --ab-env: the second run / the first)."""
    if b.get("node_env"):
        a, b = b, a
    return {"fps_total": a["processed_fps_total"] / max(1e-9, b["processed_fps_total"]),
            "cpu_ms_per_frame": a["node_cpu_ms_per_frame"] / max(1e-9, b["node_cpu_ms_per_frame"]),
            "cpu_pct": a["node_cpu_pct"] / max(1e-9, b["node_cpu_pct"]),
            "rss": a["rss_mib_end"] / max(1e-9, b["rss_mib_end"])}


def print_ratios(r: dict[str, float], what: str) -> None:
    print(f"{what}, same run: total fps x{r['fps_total']:.2f}, CPU per frame x{r['cpu_ms_per_frame']:.2f}, "
          f"CPU used x{r['cpu_pct']:.2f}, RSS x{r['rss']:.2f}")


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
          f"DDS transport {r['transport']}" + (f", node parameters {r['node_params']}" if r["node_params"] else "")
          + (f", node environment {r['node_env']}" if r["node_env"] else ""))
    print(f"  stream          {r['frames_sent_per_camera']} frames per camera, {r['size']} rgb8 at "
          f"{r['rate_hz']:g} Hz ({r['duration_s']:.1f} s); load average {r['loadavg_start']} -> {r['loadavg_end']}")
    for c in r["per_camera"]:
        print(f"  [{c['camera']}] processed {c['processed']} = {c['processed_fps']:.2f} fps "
              f"({c['dropped_pct']:.1f} % not processed); all four outputs for {c['complete_outputs']}")
        print(f"      node counters: received {c['received_by_node']} ({c['lost_before_node']} lost on the way in), "
              f"processed {c['processed_by_node']} ({c['dropped_by_node']} dropped by the node, "
              f"{c['processed_but_not_received_here']} processed but not received by this client), "
              f"{c['results_dropped_in_publish_stage']} results replaced before the publish stage took them")
        stages = ", ".join(f"{k} {v:.1f}" for k, v in c["stage_ms"].items())
        print(f"      node stage means (last 100 frames): {stages} ms")
        print(f"      e2e latency {lat(c['e2e_latency_ms'])}")
    threads = ", ".join(f"{k} {v:.2f}" for k, v in r["node_thread_cpu_ms_per_frame"].items())
    print(f"  node CPU        {r['node_cpu_ms_per_frame']:.2f} ms per processed frame, "
          f"{r['node_cpu_ms_per_received_frame']:.2f} per received frame ({r['node_cpu_pct']:.0f} % of one core, all "
          f"nodes); per processed frame by thread: {threads}")
    print(f"  total           {r['processed_fps_total']:.2f} fps processed; this client used "
          f"{r['client_cpu_pct']:.0f} % of one core")
    print(f"  node RSS        {r['rss_mib_start']:.0f} MiB at start, {r['rss_mib_end']:.0f} MiB after the run "
          f"(all nodes)")


if __name__ == "__main__":
    sys.exit(main())
