#!/usr/bin/env python3
"""Inference time against vocabulary size (issue 10): realtime presets at 8 and 150 classes.

Real architectures with random weights (seeded: ITACLIP's kept rows and recomputed pixels depend on them),
one 480x640 frame, text encoded once outside the timing (the node does it off the inference path). For
dense_clip and ITACLIP the realtime presets upsample only candidate classes (``fast_upsample``); the "exact" rows
turn it off (and ITACLIP's ``prune_names``) to show what it removes. The ratio column is time(150 classes) /
time(8 classes) in one run.

    source scripts/env.sh && python benchmarks/bench_vocab_size.py --repeats 2
    python benchmarks/bench_vocab_size.py --segmenters car fcclip --repeats 1   # the slow ones
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from benchlib import timed  # noqa: E402  (also puts the repository root on sys.path)
from bench_segmenters import model_fields, random_weights  # noqa: E402

from ovseg_ros.core.models import resolve_device  # noqa: E402
from ovseg_ros.core.segmenter import build_segmenter, get_segmenter_class  # noqa: E402
from ovseg_ros.core.vocabulary import Vocabulary, find_vocabulary_preset, load_vocabulary_file  # noqa: E402

#: Text settings that only make the untimed vocabulary encoding faster (one template instead of 80).
TEXT_FAST = {"dense_clip": {"templates": "photo"}, "itaclip": {"templates": "photo"}}
SMALL = ["floor", "wall", "chair", "table", "person, people", "door", "window", "plant"]


def vocabularies(sizes: list[int]) -> dict[int, Vocabulary]:
    ade = find_vocabulary_preset("ade20k")
    names = [c.name for c in load_vocabulary_file(ade).classes] if ade else []
    out = {}
    for n in sizes:
        if n <= len(SMALL):
            out[n] = Vocabulary.from_request(SMALL[:n])
        else:
            pool = names + [f"object {i}" for i in range(max(0, n - len(names)))]
            out[n] = Vocabulary.from_request(pool[:n])
    return out


def build(name: str, preset: str, extra: dict[str, Any], device: torch.device) -> Any:
    overrides = random_weights(extra, model_fields(name))
    own = {f.name for f in dataclasses.fields(get_segmenter_class(name).config_cls)}
    if {"allow_random", "checkpoint"} <= own:
        overrides.update(allow_random=True, checkpoint="")
    return build_segmenter(name, preset, overrides, device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--segmenters", nargs="*", default=["dense_clip", "itaclip", "clip_es"])
    ap.add_argument("--classes", nargs=2, type=int, default=[8, 150])
    ap.add_argument("--size", default="480x640")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--paths", nargs="*", default=None, help="only these rows (fast, exact, nopamr, uncap, -)")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the random weights (same for every row)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    h, w = (int(v) for v in args.size.split("x"))
    image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    vocabs = vocabularies(args.classes)
    small, large = args.classes
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"machine={platform.machine()} cpus={os.cpu_count()} size={args.size} seed={args.seed} "
          f"affinity={sorted(os.sched_getaffinity(0))} load={os.getloadavg()[0]:.2f}")
    print(f"{'segmenter':<11} {'path':<7} {f'{small} cls ms':>10} {f'{large} cls ms':>11} {'ratio':>6}")
    for name in args.segmenters:
        own = {f.name for f in dataclasses.fields(get_segmenter_class(name).config_cls)}
        exact = {"fast_upsample": False, **({"prune_names": 0} if "prune_names" in own else {})}
        paths = [("fast", {}), ("exact", exact)] if "fast_upsample" in own else [("-", {})]
        if name == "itaclip":  # PAMR refines every name's logits: the part of ITACLIP that grows with K
            paths.append(("nopamr", {"pamr_steps": 0}))
            paths.append(("uncap", {"prune_rows": 0}))  # the fast path without the cap on refined rows
        if args.paths:
            paths = [p for p in paths if p[0] in args.paths]
        for label, extra in paths:
            # The weights decide how many rows ITACLIP's prune_names keeps and how many pixels the candidate
            # upsampling must recompute: one seed for every row, so rows and runs compare.
            torch.manual_seed(args.seed)
            try:
                seg = build(name, "realtime", {**TEXT_FAST.get(name, {}), **extra}, device)
            except Exception as exc:  # report and go on
                print(f"{name:<11} skipped: {type(exc).__name__}: {exc}")
                break
            states = [seg.encode_vocabulary(vocabs[n]) for n in (small, large)]
            for st in states:  # warm-up
                seg.segment(image, st)
            # Interleaved runs, minimum of each: load changes on a shared machine hit both sizes alike.
            best = [float("inf"), float("inf")]
            for _ in range(max(1, args.repeats)):
                for i, st in enumerate(states):
                    best[i] = min(best[i], timed(lambda: seg.segment(image, st), 1, device, warmup=0))
            ms = [b * 1e3 for b in best]
            print(f"{name:<11} {label:<7} {ms[0]:>10.0f} {ms[1]:>11.0f} {ms[1] / ms[0]:>6.2f}  "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
            del seg
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
