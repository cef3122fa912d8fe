#!/usr/bin/env python3
"""ITACLIP cost per preset and input size: ViT passes per frame, latency, and its ratio to one bare forward.

The baseline ("bare") is one unmodified ViT forward of the whole frame at the size ``segment`` resizes
it to (``ITACLIPSegmenter.backbone_forward``); the ratio says what ITACLIP's windows, augmentations,
attention surgery and PAMR cost on top of the plain backbone. Speed does not depend on weight values,
so the real architecture is built with random weights (nothing to download), and the one-template text
bank is used (text is encoded once per vocabulary, never per frame).

Presets whose pass count exceeds ``--max-passes`` are not run end to end: their ViT time is estimated
from one timed batch of windows (marked ``est``), which is the dominant cost on every device.

    python benchmarks/bench_itaclip.py                                  # all presets, CPU or GPU
    python benchmarks/bench_itaclip.py --presets realtime --device cuda --precision fp16 fp32
    python benchmarks/bench_itaclip.py --presets voc21 --options '{pamr_steps: 0}' --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from benchlib import timed  # noqa: E402  (also puts the repository root on sys.path)

from ovseg_ros.core.models import resolve_device  # noqa: E402
from ovseg_ros.core.segmenter import build_segmenter, list_presets  # noqa: E402
from ovseg_ros.core.vocabulary import Vocabulary  # noqa: E402

#: Vocabulary for presets without a dataset (the robot case).
ROBOT_VOCAB = ["floor", "wall", "chair", "table", "person, people", "door", "window", "plant"]


def window_time(seg: Any, state: Any, repeats: int, device: torch.device) -> float:
    """Seconds per sliding window (all its augmented passes), from one timed batch of windows."""
    cfg = seg.config
    crops = torch.randn(cfg.batch_windows, 3, cfg.slide_crop, cfg.slide_crop, device=device)
    text = state.text.to(device)
    with torch.inference_mode():
        return timed(lambda: seg.crop_logits(crops, text), max(1, repeats // 2), device, reduce=min) / cfg.batch_windows


def post_vit_stages(seg: Any, state: Any, image: np.ndarray) -> dict[str, float]:
    """Measured times of every stage but the ViT (random logits stand in for the windows' output)."""
    q = int(state.text.shape[0])
    seg._logits = lambda x, text: torch.randn(1, q, *x.shape[-2:], device=x.device)  # instance override
    seg._pruned_logits = lambda x, text, st: (seg._logits(x, text), st.owner)  # prune_names presets: no ViT
    try:
        timings = seg.segment(image, state).timings
    finally:
        del seg._logits, seg._pruned_logits
    return {k: round(v, 4) for k, v in timings.items() if k != "backbone"}


def bench_preset(preset: str, precision: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    overrides: dict[str, Any] = {
        "model": {"pretrained": "", "checkpoint": "", "allow_random": True, "precision": precision},
        "templates": "photo",
        "llm": {"endpoint": ""},
    }
    extra = yaml.safe_load(args.options) if args.options else None
    for key, value in (extra or {}).items():  # one level deep, like merge_config
        overrides[key] = {**overrides.get(key, {}), **value} if isinstance(value, dict) else value
    seg = build_segmenter("itaclip", preset, overrides=overrides, device=device)
    vocab = seg.preset_vocabulary() or Vocabulary.from_request(ROBOT_VOCAB)
    state = seg.set_vocabulary(vocab)
    rows = []
    rng = np.random.default_rng(0)
    per_window = None
    for size in args.sizes:
        h, w = (int(v) for v in size.lower().split("x"))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        passes = seg.vit_passes(h, w)
        bare = timed(lambda: seg.backbone_forward(image), args.repeats, device, reduce=min)
        row: dict[str, Any] = {
            "preset": preset, "precision": precision, "device": str(device), "size": f"{h}x{w}",
            "processing": "x".join(map(str, seg.processing_size(h, w))), "queries": int(state.text.shape[0]),
            "passes": passes, "bare_s": bare,
        }
        if args.max_passes and passes > args.max_passes:
            if per_window is None:
                per_window = window_time(seg, state, args.repeats, device)
            rest = post_vit_stages(seg, state, image)
            windows = passes // len(seg.config.augmentations)
            row.update(latency_s=per_window * windows + sum(rest.values()), estimated=True,
                       stages={"backbone": round(per_window * windows, 4), **rest})
        else:
            result = None

            def run() -> None:
                nonlocal result
                result = seg.segment(image, state)

            row.update(latency_s=timed(run, args.repeats, device, reduce=min), estimated=False,
                       stages={k: round(v, 4) for k, v in result.timings.items()})  # type: ignore[union-attr]
        row["ratio"] = row["latency_s"] / bare
        rows.append(row)
        est = " est" if row["estimated"] else ""
        print(f"{preset:12s} {precision:5s} {row['size']:>9s} -> {row['processing']:>8s}  Q={row['queries']:4d}  "
              f"passes={passes:5d}  latency={row['latency_s']:8.3f}s{est}  bare={bare:6.3f}s  "
              f"ratio={row['ratio']:7.1f}  {row['stages']}", flush=True)
    del seg
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="*", default=None, help="default: every itaclip preset")
    ap.add_argument("--sizes", nargs="*", default=["480x640", "720x1280"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", nargs="*", default=None, help="default: fp16 and fp32 on CUDA, fp32 on CPU")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-passes", type=int, default=None,
                    help="estimate presets with more passes (default: 0 = none on CUDA, 30 on CPU)")
    ap.add_argument("--options", default="", help="YAML mapping merged onto every preset")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--json", default="", help="write the rows to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.max_passes is None:
        args.max_passes = 0 if device.type == "cuda" else 30
    precisions = args.precision or (["fp16", "fp32"] if device.type == "cuda" else ["fp32"])
    presets = args.presets or list_presets("itaclip")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"# ITACLIP benchmark on {name}, torch {torch.__version__}, random ViT weights", flush=True)
    rows = []
    for preset in presets:
        for precision in precisions:
            rows += bench_preset(preset, precision, args, device)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
