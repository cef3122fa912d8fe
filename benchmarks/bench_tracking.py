#!/usr/bin/env python3
"""Tracking quality, label flicker and cost of the node's video stage (issue 19), against exact ground truth.

Quality: synthetic sequences (:mod:`ovseg_ros.eval.video_synth`: objects of three classes that move, occlude each
other, leave and re-enter the view; a static or panning camera; frames dropped) segmented by the model-free
``color_key`` segmenter, with the errors of a real segmenter injected into its labels (``border`` label noise,
an instance ``split`` in two for a frame, a ``miss`` of an object for a frame). Per sequence and noise, with the
temporal filter off and on: HOTA, DetA, AssA, MOTA, IDF1, identity switches (TrackEval, mask IoU), flicker
(share of pixels whose published label changes where the truth does not) and the lag behind true changes.

Cost (one core): the tracker on a 640x480 id map with 50 moving thing segments per frame (the issue's budget:
<= 1 ms), its 3D centroid cue from a 640x480 16UC1 depth image (what the node adds per frame with
``publish_points``), and the temporal vote on 640x480 labels.

    source scripts/env.sh && python benchmarks/bench_tracking.py [--seeds 3] [--frames 150] [--quick]
    python benchmarks/bench_tracking.py --depth-cue-only   # the cost table's tracker and depth-cue rows only
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import cv2  # noqa: E402
import numpy as np  # noqa: E402

import benchlib  # noqa: E402,F401  (puts the repository root on sys.path)
from ovseg_ros.core.postprocess import panoptic_from_semantic  # noqa: E402
from ovseg_ros.core.temporal import FilterConfig, LabelFilter  # noqa: E402
from ovseg_ros.core.depth import Intrinsics, depth_msg_to_metres  # noqa: E402
from ovseg_ros.core.tracking import DepthCue, InstanceTracker, depth_centroids  # noqa: E402
from ovseg_ros.core.vocabulary import Vocabulary  # noqa: E402
from ovseg_ros.eval.tracking import evaluate_synthetic  # noqa: E402
from ovseg_ros.eval.video_synth import SceneConfig  # noqa: E402

SEQUENCES = {
    "static": {},
    "pan": {"pan": 0.3},
    "pan+drop": {"pan": 0.3, "drop": 0.15},
}
NOISES = {
    "none": {},
    "border 0.3": {"border": 0.3},
    "split 5%": {"split": 0.05},
    "miss 5%": {"miss": 0.05},
    "all three": {"border": 0.3, "split": 0.05, "miss": 0.05},
}


def quality(seeds: int, frames: int, max_age: float) -> None:
    print(f"\n### Tracking and flicker (means over seeds 0..{seeds - 1}, {frames} frames of 320x240 each, "
          f"track_max_age {max_age} s, panoptic_min_area 16)\n")
    print("| sequence | noise | filter | HOTA | DetA | AssA | MOTA | IDF1 | ID switches (per 100 obj-frames) | "
          "flicker | lag mean / max (frames) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for seq, skw in SEQUENCES.items():
        for noise, nkw in NOISES.items():
            for method in ("none", "vote"):
                runs = [evaluate_synthetic(SceneConfig(frames=frames, seed=s, **skw, **nkw), method, max_age_s=max_age)
                        for s in range(seeds)]
                mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
                print(f"| {seq} | {noise} | {method} | {mean['HOTA']:.3f} | {mean['DetA']:.3f} | {mean['AssA']:.3f} | "
                      f"{mean['MOTA']:.3f} | {mean['IDF1']:.3f} | {sum(r['IDSW'] for r in runs)} "
                      f"({mean['IDSW_per_100']:.2f}) | {100 * mean['flicker']:.3f} % | "
                      f"{mean['lag_mean']:.2f} / {max(r['lag_max'] for r in runs)} |", flush=True)


def designed_lag() -> None:
    """Frames until a label change on an unchanged image is published (the segmenter changes its mind)."""
    print("\n### Lag of `vote` where the image does not change (equal confidences)\n")
    print("| temporal_frames | lag (frames) |")
    print("|---|---|")
    img = np.full((8, 8, 3), 100, np.uint8)
    conf = np.ones((8, 8), np.float32)
    for n in range(1, 8):
        f = LabelFilter(FilterConfig("vote", frames=n))
        for k in range(n):
            f.apply(np.zeros((8, 8), np.int32), conf, img, k)
        lag = 0
        while (f.apply(np.ones((8, 8), np.int32), conf, img, n + lag)[0] != 1).any():
            lag += 1
        print(f"| {n} | {lag} |")


def moving_segments(frames: int, n: int = 50, h: int = 480, w: int = 640, seed: int = 0) -> list:
    """Panoptic results of ``n`` thing blobs (10 classes) on stuff, each moving 1-4 px per frame."""
    rng = np.random.default_rng(seed)
    vocab = Vocabulary.from_request(["floor"] + [f"thing{i}" for i in range(10)], is_thing=[False] + [True] * 10)
    pos = np.stack([rng.uniform(0, w - 60, n), rng.uniform(0, h - 50, n)], 1)
    vel = rng.uniform(-4, 4, (n, 2))
    size = rng.integers(20, 50, (n, 2))
    cls = 1 + np.arange(n) % 10
    out = []
    for _ in range(frames):
        labels = np.zeros((h, w), np.int32)
        for k in range(n):
            x, y = pos[k].astype(int)
            cv2.rectangle(labels, (x, y), (x + int(size[k, 0]), y + int(size[k, 1])), int(cls[k]), -1)
        pos = np.clip(pos + vel, 0, [w - 60, h - 50])
        out.append(panoptic_from_semantic(labels, np.ones((h, w), np.float32), vocab))
    return out


def _row(name: str, times: list[float]) -> None:
    print(f"| {name} | {statistics.median(times):.3f} | {float(np.percentile(times, 90)):.3f} | {min(times):.3f} |")


def _depth_msg(p, rng: np.random.Generator):
    """A 640x480 16UC1 depth image (sensor_msgs/Image-like) of ``p``'s segments, 5% holes. Each class at its own
    depth (1.0-5.5 m; stuff at 8 m): steady per object, so the gate agrees with the masks (the usual case)."""
    from types import SimpleNamespace

    lut = np.zeros(max((s.id for s in p.segments), default=0) + 1, np.uint16)
    for s in p.segments:
        lut[s.id] = 1000 + 500 * (s.class_id - 1) if s.is_thing else 8000
    mm = lut[p.segment_ids]
    mm[rng.random(mm.shape) < 0.05] = 0
    h, w = mm.shape
    return SimpleNamespace(data=mm.tobytes(), width=w, height=h, step=2 * w, encoding="16UC1", is_bigendian=0)


def cost(repeats: int, depth_only: bool = False) -> None:
    cv2.setNumThreads(1)
    frames = moving_segments(60)
    segs = statistics.mean(sum(s.is_thing for s in p.segments) for p in frames)
    rng = np.random.default_rng(2)
    depth = [_depth_msg(p, rng) for p in frames]
    intr = Intrinsics(525.0, 525.0, 319.5, 239.5, 640, 480)
    times, with_cue, decode, centroids = [], [], [], []
    for _ in range(repeats):
        tr, tr3 = InstanceTracker(), InstanceTracker()
        for k, p in enumerate(frames):
            t0 = time.thread_time()
            tr.update(p, k * 33_333_333)
            t1 = time.thread_time()
            cue = DepthCue(depth_msg_to_metres(depth[k]), intr, 0.1, 10.0)
            t2 = time.thread_time()
            c = depth_centroids(p, cue)
            t3 = time.thread_time()
            tr3.update(p, k * 33_333_333, centroids=c)
            t4 = time.thread_time()
            times.append((t1 - t0) * 1e3)
            decode.append((t2 - t1) * 1e3)
            centroids.append((t3 - t2) * 1e3)
            with_cue.append((t4 - t1) * 1e3)
    print(f"\n### Cost per 640x480 frame, one core ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs shared; CPU time of the thread, so other processes do not count)\n")
    print("| stage | median ms | p90 ms | min ms |")
    print("|---|---|---|---|")
    _row(f"tracker, {segs:.0f} thing segments (of {len(frames[0].segments)})", times)
    _row("depth cue: decode the 16UC1 depth image (`depth_msg_to_metres`)", decode)
    _row("depth cue: segment centroids (`depth_centroids`, ~5k-pixel sample)", centroids)
    _row("tracker with the depth cue, all included (decode + centroids + tracker)", with_cue)
    if depth_only:
        return
    # the vote on a realistic stream (synthetic 640x480, panning, with border noise, splits and misses) and on
    # the worst case (a still image under random labels that all change every frame: every pixel in dispute)
    from ovseg_ros.core.segmenter import build_segmenter
    from ovseg_ros.eval.video_synth import color_key_options, generate, vocabulary

    seg = build_segmenter("color_key", "realtime", color_key_options())
    state = seg.encode_vocabulary(vocabulary())
    scene = SceneConfig(width=640, height=480, frames=40, pan=0.3, border=0.3, split=0.05, miss=0.05)
    stream = []
    for fr in generate(scene):
        r = seg.segment(fr.image, state)
        stream.append((fr.image, fr.corrupt(r.labels), r.confidence))
    rng = np.random.default_rng(1)
    still = rng.integers(0, 255, (480, 640, 3), np.uint8)
    worst = [(still, rng.integers(0, 20, (480, 640)).astype(np.int32), rng.random((480, 640)).astype(np.float32))
             for _ in range(12)]
    for name, frames_in in (("synthetic stream", stream), ("worst case", worst)):
        for n in (3, 5):
            f = LabelFilter(FilterConfig("vote", frames=n))
            ft = []
            for k, (im, lab, cf) in enumerate(frames_in):
                t0 = time.thread_time()
                f.apply(lab, cf, im, k)
                ft.append((time.thread_time() - t0) * 1e3)
            ft = ft[n:]
            print(f"| temporal_filter vote, {n} frames, {name} | {statistics.median(ft):.3f} | "
                  f"{float(np.percentile(ft, 90)):.3f} | {min(ft):.3f} |")
    print("| temporal_filter none | 0 (inputs returned as they are) | | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--frames", type=int, default=150)
    p.add_argument("--repeats", type=int, default=5, help="passes over the 60-frame cost sequence")
    p.add_argument("--max-age", type=float, default=3.0, help="track_max_age (s)")
    p.add_argument("--quick", action="store_true", help="cost and lag only")
    p.add_argument("--depth-cue-only", action="store_true", help="the tracker and depth-cue cost rows only")
    args = p.parse_args()
    cost(args.repeats, args.depth_cue_only)
    if args.depth_cue_only:
        return
    designed_lag()
    if not args.quick:
        quality(args.seeds, args.frames, args.max_age)


if __name__ == "__main__":
    main()
