#!/usr/bin/env python3
"""Tracking quality, label flicker and cost of the node's video stage (issue 19), against exact ground truth.

Quality: synthetic sequences (:mod:`ovseg_ros.eval.video_synth`: objects of three classes that move, occlude each
other, leave and re-enter the view; a static or panning camera; frames dropped) segmented by the model-free
``color_key`` segmenter, with the errors of a real segmenter injected into its labels (``border`` label noise,
an instance ``split`` in two for a frame, a ``miss`` of an object for a frame). Per sequence and noise, with the
temporal filter off and on: HOTA, DetA, AssA, MOTA, IDF1, identity switches (TrackEval, mask IoU), flicker
(share of pixels whose published label changes where the truth does not) and the lag behind true changes.

Cost (one core): the tracker on a 640x480 id map with 50 moving thing segments per frame (the issue's budget:
<= 1 ms), and the temporal vote on 640x480 labels.

    source scripts/env.sh && python benchmarks/bench_tracking.py [--seeds 3] [--frames 150] [--quick]
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
from ovseg_ros.core.tracking import InstanceTracker  # noqa: E402
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


def cost(repeats: int) -> None:
    cv2.setNumThreads(1)
    frames = moving_segments(60)
    segs = statistics.mean(sum(s.is_thing for s in p.segments) for p in frames)
    times = []
    for _ in range(repeats):
        tr = InstanceTracker()
        for k, p in enumerate(frames):
            t0 = time.thread_time()
            tr.update(p, k * 33_333_333)
            times.append((time.thread_time() - t0) * 1e3)
    print(f"\n### Cost per 640x480 frame, one core ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs shared; CPU time of the thread, so other processes do not count)\n")
    print("| stage | median ms | p90 ms | min ms |")
    print("|---|---|---|---|")
    print(f"| tracker, {segs:.0f} thing segments (of {len(frames[0].segments)}) | {statistics.median(times):.3f} | "
          f"{float(np.percentile(times, 90)):.3f} | {min(times):.3f} |")
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
    args = p.parse_args()
    cost(args.repeats)
    designed_lag()
    if not args.quick:
        quality(args.seeds, args.frames, args.max_age)


if __name__ == "__main__":
    main()
