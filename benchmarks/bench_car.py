#!/usr/bin/env python3
"""CaR latency versus vocabulary size and number of recurrent steps, text-cache effect, ratio to bare forwards.

Speed does not depend on weight values, so the real architectures (ViT-B/16 CAM, ViT-L/14 classifier, or the
preset's) are built with random weights (nothing to download); ``--arch tiny`` uses the test architectures.
With random weights the loop's own decisions are meaningless, so the number of steps is *forced*: stage 2 runs
for real, then its diagonal is overwritten so that exactly one query drops per step until the requested step,
where all survive (the loop then stops); S = 1 means nothing survives step 1 (with the authors' raw-name first
step, a frame where every query survives takes at least 2 steps). The recurrence, CAMs, prompts, classifier
batches and CRF are the real ones.

Reported per (vocabulary size N, steps S): total ms and per stage (cam_encode = CAM backbone + affinity once
per image; cam = Grad-CAM + affinity refinement per step; classify = prompts + one classifier batch per step;
refine = dense CRF), and the ratios of the total to one bare forward of the CAM backbone at the CAM input size
and of the classifier at its input size (batch 1). Text: encode_vocabulary cold (empty caches) vs warm
(memory cache), and what the authors' per-step re-encoding (N x 15 classifier prompts + N CAM texts per
step) would add to every frame.

    python benchmarks/bench_car.py --arch tiny                         # seconds, CI-sized
    python benchmarks/bench_car.py --preset voc --size 240x320 --vocab 1 2 4 --steps 1 2 --repeats 1
    python benchmarks/bench_car.py --preset realtime --size 480x640 --device cuda --json car.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from benchlib import timed  # noqa: E402  (also puts the repository root on sys.path)

from ovseg_ros.core.models import resolve_device  # noqa: E402
from ovseg_ros.core.segmenter import build_segmenter, load_preset  # noqa: E402
from ovseg_ros.core.vocabulary import Vocabulary  # noqa: E402

#: Thing classes of a robot scene, cycled when more are requested.
CLASSES = ["chair", "table", "person", "door", "monitor", "cup", "bottle", "plant", "bag", "laptop", "book",
           "box", "cart", "robot", "shelf", "lamp"]


def force_steps(seg: Any, steps: int) -> None:
    """Make the loop take exactly ``steps`` steps: drop the last live query per step, then keep all."""
    real = type(seg)._classify
    counter = {"step": 0}

    def classify(self: Any, img: Any, props: torch.Tensor, text: torch.Tensor, kinds: tuple,
                 negatives: Any = None) -> torch.Tensor:
        p = real(self, img, props, text, kinds, negatives).clone()
        counter["step"] += 1
        d = torch.ones(p.shape[0])
        if steps == 1:
            d[:] = 0.0  # nothing survives step 1: the loop stops at once (else an all-keep step 1 runs step 2)
        elif counter["step"] < steps and p.shape[0] > 1:
            d[-1] = 0.0
        p[range(p.shape[0]), range(p.shape[0])] = d.to(p)
        return p

    seg._classify = classify.__get__(seg)
    seg._force_counter = counter


def model_overrides(args: argparse.Namespace, extra: dict) -> dict:
    """Random-weight model specs: the tiny test models, or the architectures of ``--options`` / the preset."""
    if args.arch == "tiny":
        names = {"cam_model": "ovseg-tiny-vit", "classifier_model": "ovseg-tiny-vit-l4"}
    else:
        preset = load_preset("car", args.preset)
        names = {k: (extra.get(k) or preset.get(k) or {}).get("name", d) for k, d in
                 (("cam_model", "ViT-B-16-quickgelu"), ("classifier_model", "ViT-L-14-quickgelu"))}
    return {k: {"name": v, "pretrained": "", "checkpoint": "", "allow_random": True, "precision": args.precision}
            for k, v in names.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="voc")
    ap.add_argument("--arch", default="real", choices=["real", "tiny"])
    ap.add_argument("--size", default="480x640")
    ap.add_argument("--vocab", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, nargs="*", default=[1, 2, 3])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--options", default="", help="YAML mapping merged onto the preset")
    ap.add_argument("--skip-text", action="store_true", help="skip the text-encoding table")
    ap.add_argument("--json", default="", help="write the rows here")
    args = ap.parse_args()

    import yaml

    device = resolve_device(args.device)
    extra = yaml.safe_load(args.options) if args.options else {}
    overrides = {**extra, **model_overrides(args, extra)}
    seg = build_segmenter("car", args.preset, overrides, device)
    h, w = (int(v) for v in args.size.split("x"))
    image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    cfg = seg.config
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} preset={args.preset} "
          f"cam={cfg.cam_model.name} classifier={cfg.classifier_model.name} image={w}x{h} "
          f"templates={len(cfg.templates)} crf={cfg.crf}")

    bare_cam = timed(lambda: seg.backbone_forward(image), args.repeats, device)
    bare_cls = timed(lambda: seg.classifier_forward(1), args.repeats, device)
    print(f"bare forward: CAM backbone {bare_cam * 1e3:.1f} ms, classifier (batch 1) {bare_cls * 1e3:.1f} ms")
    rows: list[dict] = []

    # --- text: cold vs cached, and the authors' per-step re-encoding ------------------------------------
    if not args.skip_text:
        print(f"\n{'N':>3} {'encode cold ms':>14} {'encode warm ms':>14} {'authors/step ms':>15}")
    for n in ([] if args.skip_text else args.vocab):
        vocab = Vocabulary.from_request([CLASSES[i % len(CLASSES)] + ("" if i < len(CLASSES) else f" {i}")
                                         for i in range(n)])
        encoders = {id(e): e for e in (seg.classifier.text, getattr(seg.stage1, "text", seg.classifier.text))}

        def cold() -> None:
            for e in encoders.values():
                e._memory.clear()
            seg.encode_vocabulary(vocab)

        t_cold = timed(cold, args.repeats, device, warmup=0)
        t_warm = timed(lambda: seg.encode_vocabulary(vocab), args.repeats, device)
        st = seg.encode_vocabulary(vocab)
        prompts = [t.format(q) for q in st.queries for t in cfg.templates] + list(st.cam_templated)
        t_step = timed(lambda: seg.classifier.text._encode(prompts), args.repeats, device)
        print(f"{n:>3} {t_cold * 1e3:14.1f} {t_warm * 1e3:14.2f} {t_step * 1e3:15.1f}")
        rows.append({"kind": "text", "N": n, "cold_s": t_cold, "warm_s": t_warm, "authors_per_step_s": t_step})

    # --- latency vs N and steps ------------------------------------------------------------------------
    print(f"\n{'N':>3} {'S':>2} {'total ms':>9} {'x CAM':>6} {'x cls':>6}  stages (ms)")
    for n in args.vocab:
        names = [CLASSES[i % len(CLASSES)] + ("" if i < len(CLASSES) else f" {i}") for i in range(n)]
        state = seg.encode_vocabulary(Vocabulary.from_request(names, is_thing=[True] * n))
        for s in args.steps:
            if s > max(n, 2 if cfg.cam_raw_names_first_step else 1):
                continue  # forcing S steps by dropping one query per step needs N >= S
            force_steps(seg, s)
            holder: dict[str, Any] = {}

            def run() -> None:
                seg._force_counter["step"] = 0
                holder["r"] = seg.segment(image, state)

            total = timed(run, args.repeats, device)
            taken = len(seg.last_loops[0].steps)
            stages = {k: v for k, v in holder["r"].timings.items()}
            text = " ".join(f"{k}={v * 1e3:.0f}" for k, v in stages.items())
            print(f"{n:>3} {taken:>2} {total * 1e3:9.1f} {total / bare_cam:6.1f} {total / bare_cls:6.1f}  {text}")
            rows.append({"kind": "segment", "N": n, "steps": taken, "total_s": total, "stages_s": stages,
                         "ratio_cam": total / bare_cam, "ratio_classifier": total / bare_cls})
    rows.append({"kind": "bare", "cam_s": bare_cam, "classifier_s": bare_cls, "size": args.size,
                 "preset": args.preset, "device": str(device), "threads": torch.get_num_threads()})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
