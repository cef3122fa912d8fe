#!/usr/bin/env python3
"""Latency per stage of every segmenter, and its ratio to one bare backbone forward at the same input.

Speed does not depend on weight values, so the real architectures are built with random weights
(nothing to download). Ratios are measured in one run on one machine and are the figures to compare;
absolute times depend on the machine.

    python benchmarks/bench_segmenters.py --sizes 480x640 720x1280 --repeats 3
    python benchmarks/bench_segmenters.py --segmenters dense_clip --presets realtime default --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from benchlib import timed  # noqa: E402  (also puts the repository root on sys.path)

from ovseg_ros.core.models import resolve_device  # noqa: E402
from ovseg_ros.core.segmenter import build_segmenter, get_segmenter_class, list_presets, list_segmenters  # noqa: E402,E501
from ovseg_ros.core.vocabulary import Vocabulary  # noqa: E402

VOCAB = ["floor", "wall", "chair", "table", "person, people", "door", "window", "plant"]


def random_weights(overrides: dict[str, Any], model_keys: list[str]) -> dict[str, Any]:
    """Point every model spec of the config at random weights of the same architecture."""
    out = dict(overrides)
    for key in model_keys:
        out[key] = {**out.get(key, {}), "pretrained": "", "checkpoint": "", "allow_random": True}
    return out


def model_fields(segmenter: str) -> list[str]:
    """Config fields holding a ModelSpec (CaR has two: its CAM and its classifier)."""
    import typing

    from ovseg_ros.core.models import ModelSpec
    from ovseg_ros.core.segmenter import get_segmenter_class

    hints = typing.get_type_hints(get_segmenter_class(segmenter).config_cls)
    return [name for name, hint in hints.items() if hint is ModelSpec]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--segmenters", nargs="*", default=None)
    ap.add_argument("--presets", nargs="*", default=["realtime"], help="presets to run where they exist")
    ap.add_argument("--sizes", nargs="*", default=["480x640", "720x1280"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--options", default="", help="YAML mapping merged onto every preset")
    args = ap.parse_args()

    import yaml

    device = resolve_device(args.device)
    extra = yaml.safe_load(args.options) if args.options else {}
    vocab = Vocabulary.from_request(VOCAB)
    rng = np.random.default_rng(0)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} vocabulary={len(vocab)} classes")
    print(f"{'segmenter':<11} {'preset':<13} {'size':<9} {'total ms':>9} {'backbone ms':>11} {'ratio':>6}  stages (ms)")
    # color_key has no model: it is the ROS-layer benchmark's stand-in, not a method to compare.
    for name in args.segmenters or [n for n in list_segmenters() if n != "color_key"]:
        for preset in [p for p in args.presets if p in list_presets(name)] or [""]:
            keys = model_fields(name)
            overrides = random_weights(extra, keys)
            own = {f.name for f in dataclasses.fields(get_segmenter_class(name).config_cls)}
            if {"allow_random", "checkpoint"} <= own:  # a method's own trained weights (FC-CLIP's head)
                overrides.update(allow_random=True, checkpoint="")
            for key in keys:
                overrides[key]["precision"] = args.precision
            try:
                seg = build_segmenter(name, preset, overrides, device)
                state = seg.encode_vocabulary(vocab)
            except Exception as exc:  # report and go on: one method must not stop the table
                print(f"{name:<11} {preset:<13} skipped: {type(exc).__name__}: {exc}")
                continue
            for size in args.sizes:
                h, w = (int(v) for v in size.split("x"))
                image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                result_holder: dict[str, Any] = {}

                def run() -> None:
                    result_holder["r"] = seg.segment(image, state)

                total = timed(run, args.repeats, device)
                try:
                    base = timed(lambda: seg.backbone_forward(image), args.repeats, device)
                    ratio = f"{total / base:6.1f}"
                    base_ms = f"{base * 1000:11.1f}"
                except NotImplementedError:
                    ratio, base_ms = "   n/a", "        n/a"
                stages = " ".join(f"{k}={v * 1000:.0f}" for k, v in result_holder["r"].timings.items())
                print(f"{name:<11} {preset or '-':<13} {size:<9} {total * 1000:9.1f} {base_ms} {ratio}  {stages}")
            if device.type == "cuda":
                print(f"{'':<11} peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
                torch.cuda.reset_peak_memory_stats(device)



if __name__ == "__main__":
    main()
