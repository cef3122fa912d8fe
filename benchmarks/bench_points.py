"""Cost of the semantic point cloud per frame (ovseg_ros.core.depth), on one core.

    python benchmarks/bench_points.py                   # 640x480 labels: 16UC1 and 32FC1 depth, same size and
                                                        # 1280x720 -> 640x360 resampled, with and without rgb
    python benchmarks/bench_points.py --repeats 200

Stages timed (minimum of ``--repeats`` runs; ``--median`` for medians): decode (bytes -> metres, invalid ->
NaN), resample (nearest, only when sizes differ), cloud (``semantic_cloud``: x y z with the range check,
confidence, label, [rgb], written straight into the PointCloud2 buffer), copy (a fresh numpy buffer into a new
``array('B')``), and the total of the chain as ``SemanticPointsOutput`` runs it per frame (decode, resample,
cloud written in place into the message's kept ``array('B')``); "fresh buffers" is the same chain with new
buffers every frame. For reference, the two-step form ``project`` + ``pack_cloud`` (intermediate arrays) is
timed too.
Target: <= 5 ms per 640x480 frame on one core.
"""

from __future__ import annotations

import argparse
import os
import statistics
import array
import types
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import benchlib  # noqa: E402  (also puts the repository root on sys.path)
from ovseg_ros.core import depth as dp  # noqa: E402


REDUCE: Callable[[list[float]], float] = min
CPU = benchlib.torch.device("cpu")


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """``REDUCE`` (min by default: least disturbed by other processes; --median) of the run times, ms."""
    return benchlib.timed(fn, repeats, CPU, reduce=REDUCE) * 1e3


def depth_msg(width: int, height: int, encoding: str, rng: np.random.Generator) -> Any:
    metres = rng.uniform(0.3, 12.0, (height, width)).astype(np.float32)
    metres[rng.random((height, width)) < 0.05] = 0.0  # holes
    if encoding == "16UC1":
        arr = np.rint(metres * 1000).astype(np.uint16)
    else:
        arr = metres
        arr[arr == 0] = np.nan
    return types.SimpleNamespace(width=width, height=height, step=width * arr.dtype.itemsize, encoding=encoding,
                                 is_bigendian=False, data=arr.tobytes())


def run_case(label_hw: tuple[int, int], depth_hw: tuple[int, int], encoding: str, rgb: bool, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    h, w = label_hw
    dh, dw = depth_hw
    msg = depth_msg(dw, dh, encoding, rng)
    intr = dp.Intrinsics(0.9 * dw, 0.9 * dw, (dw - 1) / 2, (dh - 1) / 2, dw, dh).scaled(w, h)
    labels = rng.integers(-1, 20, (h, w)).astype(np.int32)
    conf = rng.random((h, w), dtype=np.float32)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8) if rgb else None
    metres = dp.depth_msg_to_metres(msg)
    small = dp.resample_nearest(metres, h, w)
    data, _ = dp.semantic_cloud(small, intr, 0.1, 10.0, labels, conf, 255, image)

    def copy() -> None:
        buf = array.array("B")
        buf.frombytes(data.data)

    keep = array.array("B", bytes(data.size))
    keep_f32 = np.frombuffer(keep, dtype=np.float32)

    def total() -> None:  # as SemanticPointsOutput does it: the message's buffer is kept and written in place
        m = dp.resample_nearest(dp.depth_msg_to_metres(msg), h, w)
        dp.semantic_cloud(m, intr, 0.1, 10.0, labels, conf, 255, image, out=keep_f32)

    def total_fresh() -> None:  # a new buffer per frame, copied into a new array('B')
        m = dp.resample_nearest(dp.depth_msg_to_metres(msg), h, w)
        out, _ = dp.semantic_cloud(m, intr, 0.1, 10.0, labels, conf, 255, image)
        buf = array.array("B")
        buf.frombytes(out.data)

    def two_step() -> None:
        p = dp.project(small, intr, 0.1, 10.0)
        lab = labels.astype(np.uint16)
        lab[labels < 0] = 255
        dp.pack_cloud(p, lab, conf, image)

    return {
        "decode": median_ms(lambda: dp.depth_msg_to_metres(msg), repeats),
        "resample": median_ms(lambda: dp.resample_nearest(metres, h, w), repeats) if (dh, dw) != (h, w) else 0.0,
        "cloud": median_ms(lambda: dp.semantic_cloud(small, intr, 0.1, 10.0, labels, conf, 255, image), repeats),
        "copy": median_ms(copy, repeats),
        "total": median_ms(total, repeats),
        "fresh": median_ms(total_fresh, repeats),
        "two_step": median_ms(two_step, repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--median", action="store_true", help="report medians instead of minima")
    args = ap.parse_args()
    global REDUCE
    REDUCE = statistics.median if args.median else min
    cases = [
        ("640x480 labels, 16UC1 640x480", (480, 640), (480, 640), "16UC1", False),
        ("640x480 labels, 32FC1 640x480", (480, 640), (480, 640), "32FC1", False),
        ("640x480 labels, 16UC1 640x480, rgb", (480, 640), (480, 640), "16UC1", True),
        ("640x360 labels, 16UC1 1280x720 (resampled)", (360, 640), (720, 1280), "16UC1", False),
        ("1280x720 labels, 16UC1 1280x720", (720, 1280), (720, 1280), "16UC1", False),
    ]
    how = "median" if args.median else "minimum"
    print(f"one core (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), {how} of {args.repeats} runs, ms")
    print(f"{'case':46s} {'decode':>7s} {'resample':>8s} {'cloud':>6s} {'copy':>5s} {'total':>6s} "
          f"{'(fresh buffers)':>15s} {'(project+pack)':>14s}")
    for name, lhw, dhw, enc, rgb in cases:
        r = run_case(lhw, dhw, enc, rgb, args.repeats)
        print(f"{name:46s} {r['decode']:7.2f} {r['resample']:8.2f} {r['cloud']:6.2f} {r['copy']:5.2f} "
              f"{r['total']:6.2f} {r['fresh']:15.2f} {r['two_step']:14.2f}")


if __name__ == "__main__":
    main()
