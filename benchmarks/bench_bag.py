"""``ovseg-bag`` throughput in frames/s on a synthetic 640x480 RGB-D recording (MCAP in, MCAP out).

Two rows: the model-free ``color_key`` segmenter (what the tool itself costs: reading, decoding, building the
node's messages and the semantic cloud, canonical CDR, parts, merge) and ``dense_clip`` ``realtime`` with a
real ViT-B/16 architecture and random weights (what a CPU run of a method costs). One run each; the load of the
machine is printed. Needs the built package (source scripts/env.sh).

``--merge-frames N`` also times the merge's sequential ~/panoptic pass per frame (ros/offline.py
``OfflineNode.track_panoptic``: deserialize, id image back, the node's tracker, rebuild and serialize) on N
640x480 color_key frames of one moving object, with ``track_instances`` on and off.

    python benchmarks/bench_bag.py --frames 100 --model-frames 10 --merge-frames 200
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "ros"))  # the tests' synthetic recording writer

from bag_helpers import COLOR, DEPTH, INFO, VOCAB, frame_image, write_rgbd_bag  # noqa: E402


def run(args: list[str]) -> tuple[float, str]:
    from ovseg_ros.tools.bag import main

    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"ovseg-bag failed: {err.getvalue()[-2000:]}")
    loop = re.search(r"now at ([0-9.]+) frames/s", err.getvalue())
    return seconds, loop.group(1) if loop else "?"


def merge_pass_ms(frames: int, tracking: bool) -> float:
    """Mean ms per frame of OfflineNode.track_panoptic over ``frames`` frames, in order (one camera)."""
    from std_msgs.msg import Header

    from ovseg_ros.ros import offline
    from ovseg_ros.ros.params import NodeConfig

    values = offline.node_values({"segmenter": "color_key", "device": "cpu", "cache_dir": "", "vocabulary": VOCAB,
                                  "track_instances": tracking})
    cfg = NodeConfig.from_values(values)
    cam = offline.CameraTopics("", COLOR, False)
    node = offline.OfflineNode(cfg, offline.configure(cfg, "cpu"), "segment_node", [cam], set(), timings=False)
    topic = node.topic("", "panoptic")
    parts = []
    for i in range(frames):
        image = frame_image(i % 8, 640, 480, steady=True)  # 8 positions, then back: a new object every 8 frames
        header = Header(frame_id="cam")
        header.stamp.sec, header.stamp.nanosec = 1000 + i // 10, (i % 10) * 100_000_000
        result, ms = node.segment(image)
        parts += [raw for _, t, raw in node.frame_outputs("", header, image, result, ms) if t == topic]
    t0 = time.perf_counter()
    for i, raw in enumerate(parts):
        node.track_panoptic(topic, raw, i)
    return (time.perf_counter() - t0) * 1e3 / max(len(parts), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--model-frames", type=int, default=10)
    p.add_argument("--merge-frames", type=int, default=0, help="also time the merge's ~/panoptic pass")
    a = p.parse_args()
    if a.merge_frames:
        for tracking in (True, False):
            print(f"merge ~/panoptic pass, 640x480, track_instances {tracking}: "
                  f"{merge_pass_ms(a.merge_frames, tracking):.2f} ms/frame over {a.merge_frames} frames", flush=True)
        if not a.frames and not a.model_frames:
            return
    print(f"load average before: {os.getloadavg()}, cpus {os.cpu_count()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '-')}")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        from ovseg_ros.core.models import save_random_checkpoint

        weights = save_random_checkpoint("ViT-B-16", t / "vitb16.pt", seed=0)
        rows = []
        for name, frames, extra in (
            ("color_key (tool only)", a.frames, ["--segmenter", "color_key"]),
            ("dense_clip realtime, ViT-B-16 random", a.model_frames,
             ["--segmenter", "dense_clip", "--model", "ViT-B-16", "--checkpoint", str(weights)]),
        ):
            rec = write_rgbd_bag(t / f"in{len(rows)}", "mcap", frames=frames, w=640, h=480)
            out = t / f"out{len(rows)}"
            args = [str(rec.path), "-o", str(out), "--device", "cpu", "--cache-dir", "", "--vocabulary", *VOCAB,
                    "--image", COLOR, "--depth", DEPTH, "--camera-info", INFO, "--no-progress", *extra]
            seconds, loop = run(args)
            rows.append((name, frames, seconds))
            print(f"{name}: {frames} frames; segmentation loop {loop} frames/s; whole command {seconds:.1f} s = "
                  f"{frames / seconds:.2f} frames/s (start-up, vocabulary encoding and merge included)", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
