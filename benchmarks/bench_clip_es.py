"""CLIP-ES latency versus the number of present classes and the input size, relative to one bare forward.

Random weights (latency does not depend on them), so it runs anywhere offline. For every input size the
bare backbone forward (all blocks + projection at the size CLIP-ES uses) is the unit; for every number of
present classes P (given as tags, so the presence decision does not vary) it times ``segment`` and its
stages, batched (``max_batch`` = P) and, with ``--one-at-a-time``, with one backward per class.

Examples::

    OMP_NUM_THREADS=2 python benchmarks/bench_clip_es.py --model ViT-B-16-quickgelu --sizes 240x320 480x640
    python benchmarks/bench_clip_es.py --device cuda --sizes 480x640 720x1280 --classes 1 2 4 8 16 --crf
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from benchlib import timed  # noqa: E402  (also puts the repository root on sys.path)

from ovseg_ros.core.segmenter import build_segmenter  # noqa: E402
from ovseg_ros.core.vocabulary import Vocabulary  # noqa: E402

VOCAB = ["person", "chair", "table", "door", "floor", "sofa", "bottle", "cup", "laptop", "bag", "plant", "tv",
         "bed", "lamp", "box", "shelf", "window", "cabinet", "book", "dog"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-16-quickgelu", help="open_clip architecture (random weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--sizes", nargs="+", default=["240x320", "480x640"], help="HxW input sizes (used as is)")
    p.add_argument("--classes", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--crf", action="store_true", help="include the dense CRF (off in the realtime preset)")
    p.add_argument("--one-at-a-time", action="store_true", help="also time max_batch=1 (one backward per class)")
    p.add_argument("--grad-mode", default="replicate", choices=("replicate", "vmap"),
                   help="how the per-class backward is batched (ClipCam grad_mode)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = {"name": args.model, "pretrained": "", "allow_random": True, "precision": args.precision}
    base = {"model": model, "short_side": 0, "max_long_side": 0, "crf": args.crf, "crf_max_side": 0}
    seg = build_segmenter("clip_es", "realtime", base, device=device)
    seg.cam.grad_mode = args.grad_mode
    state = seg.encode_vocabulary(Vocabulary.from_request(VOCAB))
    rng = np.random.RandomState(0)
    results = []
    print(f"model={args.model} device={device} threads={torch.get_num_threads()} crf={args.crf} "
          f"grad_mode={args.grad_mode} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')})")
    for size in args.sizes:
        h, w = (int(v) for v in size.lower().split("x"))
        image = (rng.rand(h, w, 3) * 255).astype(np.uint8)
        bare = timed(lambda: seg.backbone_forward(image), args.repeats, device, warmup=args.warmup)
        tokens = ((h + 15) // 16) * ((w + 15) // 16)
        print(f"\n{h}x{w} ({tokens} tokens): bare forward {bare * 1e3:.0f} ms")
        print(f"{'P':>3} {'batch':>5} {'total ms':>9} {'x bare':>7}  stages (ms)")
        for n in args.classes:
            for batch in ([n, 1] if args.one_at_a_time and n > 1 else [n]):
                seg.cam.max_batch = batch
                present = list(range(n))
                last = {}

                def run() -> None:
                    last["r"] = seg.segment(image, state, present=present)

                total = timed(run, args.repeats, device, warmup=args.warmup)
                stages = {k: round(v * 1e3, 1) for k, v in last["r"].timings.items()}
                print(f"{n:>3} {batch:>5} {total * 1e3:>9.0f} {total / bare:>7.2f}  {stages}")
                results.append({"size": [h, w], "tokens": tokens, "present": n, "max_batch": batch,
                                "total_s": total, "bare_s": bare, "ratio": total / bare, "stages_ms": stages})
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "device": str(device), "crf": args.crf, "grad_mode": args.grad_mode,
                                               "threads": torch.get_num_threads(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
