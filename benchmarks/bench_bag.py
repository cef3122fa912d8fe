"""``ovseg-bag`` throughput in frames/s on a synthetic 640x480 RGB-D recording (MCAP in, MCAP out).

Two rows: the model-free ``color_key`` segmenter (what the tool itself costs: reading, decoding, building the
node's messages and the semantic cloud, canonical CDR, parts, merge) and ``dense_clip`` ``realtime`` with a
real ViT-B/16 architecture and random weights (what a CPU run of a method costs). One run each; the load of the
machine is printed. Needs the built package (source scripts/env.sh).

    python benchmarks/bench_bag.py --frames 100 --model-frames 10
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

from bag_helpers import COLOR, DEPTH, INFO, VOCAB, write_rgbd_bag  # noqa: E402


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--model-frames", type=int, default=10)
    a = p.parse_args()
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
