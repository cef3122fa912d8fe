#!/usr/bin/env python3
"""The trade-offs of the sync-free mode (docs/benchmarks.md, "Host synchronisation per frame"), one run, ratios.

1. CaR's loop: what it computes now (one host read per step, later steps only over the survivors) against a
   fixed number of device rounds over every query with a survivor mask (no read, but stage 1 and stage 2 for
   dead queries and converged steps: ``step_limit`` rounds x N queries).
2. The Grad-CAM retry without background words (CaR): batched into the same backward for every target (the
   sync-free mode) against decided on the host (a read per CAM, a second backward only for all-zero CAMs).

Random weights (speed does not depend on them); ``--arch tiny`` is the test ViT as both CaR models.

    python benchmarks/bench_host_sync.py                         # tiny, 240x320, CPU, one thread
    python benchmarks/bench_host_sync.py --arch preset --device cuda
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from benchlib import timed  # noqa: E402  (also puts the repository root on sys.path)

from ovseg_ros.core import models  # noqa: E402
from ovseg_ros.core.models import resolve_device, save_random_checkpoint  # noqa: E402
from ovseg_ros.core.segmenter import StageTimer, build_segmenter  # noqa: E402
from ovseg_ros.core.segmenters.car import step_limit  # noqa: E402
from ovseg_ros.core.vocabulary import Vocabulary  # noqa: E402


def _image(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:, : w // 2], img[:, w // 2:], img[h // 3: 2 * h // 3, 3 * w // 8: 5 * w // 8] = (200, 30, 30), (30, 30, 200), (30, 200, 30)
    return (img * 0.7 + rng.integers(0, 70, img.shape)).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=("tiny", "preset"), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="240x320")
    ap.add_argument("--vocab", type=int, nargs="+", default=[6, 20])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    h, w = (int(v) for v in args.size.split("x"))
    overrides: dict = {}
    if args.arch == "tiny":
        ck = save_random_checkpoint("ovseg-tiny-vit", Path(tempfile.mkdtemp()) / "vit.pt", seed=0)
        spec = {"name": "ovseg-tiny-vit", "pretrained": "", "checkpoint": str(ck), "precision": "fp32"}
        overrides = {"cam_model": spec, "classifier_model": spec}
    else:
        overrides = {"cam_model": {"allow_random": True}, "classifier_model": {"allow_random": True}}
    seg = build_segmenter("car", "realtime", overrides, device=dev)
    img = _image(h, w)
    print(f"CaR realtime ({args.arch}), {w}x{h}, {dev}, load {os.getloadavg()[0]:.1f}, min of {args.repeats}")
    for n in args.vocab:
        names = ["floor", "wall", "chair", "table", "person", "door"] + [f"thing {i}" for i in range(n - 6)]
        st = seg.encode_vocabulary(Vocabulary.from_request(names[:n]))
        p = seg._passes(st)[0]
        timer = StageTimer(seg.device)
        prepared, im = seg.stage1.prepare(img), seg._image(img)
        limit = step_limit(len(p.ids), seg.config.max_steps)
        every = list(range(len(p.ids)))

        def loop():
            return seg._loop(prepared, im, st, p, False, timer)

        def fixed_rounds():  # every query, every step up to the limit: what a mask-only device loop computes
            for _ in range(limit):
                props = seg.stage1.propose(prepared, [st.cam_templated[p.ids[a]] for a in every], p.background)
                seg._classify(im, props, st.text_bank[[p.ids[a] for a in every]], p.kinds, st.negatives)

        live = [len(s.queries) for s in loop().steps]
        a = timed(loop, args.repeats, dev, reduce=min)
        b = timed(fixed_rounds, args.repeats, dev, reduce=min)
        print(f"  {n:3d} classes: steps taken {len(live)} (live {live}) of {limit}; read per step {a * 1e3:.1f} ms, "
              f"{limit} fixed rounds x {len(every)} queries {b * 1e3:.1f} ms: {b / a:.2f}x")
    cam, enc = seg.stage1.cam, prepared.encoding
    text = seg.stage1.text.encode_texts(list(st.cam_templated[:3])).float()
    bg = seg.stage1.text.encode_texts(list(p.background)).float()
    saved = set(models.SYNC_FREE_DEVICE_TYPES)
    times = {}
    for free in (False, True):
        models.SYNC_FREE_DEVICE_TYPES = saved | {dev.type} if free else saved - {dev.type}
        times[free] = timed(lambda: cam.gradcam(enc, text, bg, range(3), retry_without_background=True),
                            args.repeats * 3, dev, reduce=min)
    models.SYNC_FREE_DEVICE_TYPES = saved
    print(f"  Grad-CAM, 3 targets with the retry: decided on the host {times[False] * 1e3:.1f} ms, batched "
          f"{times[True] * 1e3:.1f} ms: {times[True] / times[False]:.2f}x")


if __name__ == "__main__":
    main()
