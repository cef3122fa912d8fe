#!/usr/bin/env python3
"""Cost of stable class ids per frame: ``messages.wire_labels`` with ids that are not positions (one LUT)
against the identity ids of a first vocabulary (one cast), and the id assignment of a vocabulary change.

Labels: a realistic map (20 classes in blobs, 10 % unlabeled) at each size; one core; minimum of ``--repeats``.

    source scripts/env.sh && python benchmarks/bench_class_ids.py --repeats 50
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import benchlib  # noqa: E402  (also puts the repository root on sys.path)
from ovseg_ros.core.class_ids import assign_class_ids  # noqa: E402
from ovseg_ros.core.vocabulary import MAX_CLASSES, Vocabulary  # noqa: E402

CPU = torch.device("cpu")


def ms(fn, repeats: int) -> float:
    return benchlib.timed(fn, repeats, CPU, reduce=min) * 1e3


def label_map(h: int, w: int, n: int, rng: np.random.Generator) -> np.ndarray:
    small = rng.integers(-1, n, (max(1, h // 40), max(1, w // 40))).astype(np.int32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="*", default=["480x640", "720x1280"])
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    from ovseg_ros.ros import messages

    rng = np.random.default_rng(0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus (1 thread used), "
          f"python {sys.version.split()[0]}, numpy {np.__version__}, opencv {cv2.__version__}")
    print(f"{'size':<9} {'classes':>7} {'encoding':<8} {'identity ms':>11} {'stable ms':>10} {'ratio':>6}")
    for size in args.sizes:
        h, w = (int(v) for v in size.split("x"))
        for n, ids, enc in ((20, list(range(40, 60)), "mono8"), (300, list(range(1000, 1300)), "mono16")):
            labels = label_map(h, w, n, rng)
            plain = Vocabulary.from_request([f"c{i}" for i in range(n)])
            stable = plain.with_ids(ids)
            a = ms(lambda: messages.wire_labels(labels, plain), args.repeats)
            b = ms(lambda: messages.wire_labels(labels, stable), args.repeats)
            print(f"{size:<9} {n:>7} {enc:<8} {a:>11.3f} {b:>10.3f} {b / a:>5.2f}x")
    names = [f"c{i}" for i in range(2000)]
    table = assign_class_ids(None, names[:200], 1, MAX_CLASSES).table
    times = []
    for r in range(2, 52):  # 200 classes, half replaced at each change
        start = (r * 100) % 1800
        t = ms(lambda: assign_class_ids(table, names[start:start + 200], r, MAX_CLASSES), 3)
        table = assign_class_ids(table, names[start:start + 200], r, MAX_CLASSES).table
        times.append(t)
    print(f"assign_class_ids, 200 classes, half replaced per change: median {statistics.median(times):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
