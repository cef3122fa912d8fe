#!/usr/bin/env python3
"""Torch vs ONNX Runtime image backend per segmenter, one run: the whole ``segment()`` per frame, interleaved.

Each segmenter is built once with random weights of its real architecture (speed does not depend on weight
values), its image encoder exported with ``ovseg-export``'s code, and the same segmenter object then runs
frames alternately on the torch encoder and on the ONNX Runtime session (so both see the same machine load).
Printed: median ms per frame of each, the ratio torch / ONNX Runtime (> 1: ONNX Runtime faster), the label
agreement of the two, the export time, the first ONNX Runtime frame and the attach time (session creation; with
TensorRT or CUDA the engine is built or loaded there, at configure, with the file's optimisation profile), both
apart from the steady state. ``--dynamic`` exports without ``--sizes``: TensorRT then gets the profile of a
dynamic-size file (docs/deploy.md).

    python benchmarks/bench_onnx.py                                   # CPU provider, fp32, 480x640
    python benchmarks/bench_onnx.py --device cuda --precision fp16 --providers cuda
    python benchmarks/bench_onnx.py --device cuda --precision fp16 --providers tensorrt --trt-cache /tmp/trt
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from bench_segmenters import VOCAB, model_fields, random_weights  # noqa: E402  (puts the repo on sys.path)

from ovseg_ros.core.deploy import BackendOptions, attach_onnx, export_onnx  # noqa: E402
from ovseg_ros.core.models import resolve_device  # noqa: E402
from ovseg_ros.core.segmenter import build_segmenter, get_segmenter_class  # noqa: E402
from ovseg_ros.core.vocabulary import Vocabulary  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _once(fn: Any, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--segmenters", nargs="*", default=["dense_clip", "itaclip", "fcclip"])
    ap.add_argument("--preset", default="realtime")
    ap.add_argument("--size", default="480x640")
    ap.add_argument("--repeats", type=int, default=5, help="timed frames per backend (interleaved)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="of both backends")
    ap.add_argument("--providers", default="cpu", help="ONNX Runtime providers, comma-separated")
    ap.add_argument("--trt-cache", default="", help="TensorRT engine cache (default: a temporary folder)")
    ap.add_argument("--options", default="", help="YAML mapping merged onto the preset (e.g. a smaller model)")
    ap.add_argument("--keep", default="", help="folder to keep the exported files in")
    ap.add_argument("--dynamic", action="store_true",
                    help="export with dynamic height/width (no declared size; segmenters with a static graph keep "
                         "their one size)")
    args = ap.parse_args()

    device = resolve_device(args.device)
    h, w = (int(v) for v in args.size.split("x"))
    image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    vocab = Vocabulary.from_request(VOCAB)
    folder = Path(args.keep or tempfile.mkdtemp(prefix="ovseg_onnx_"))
    folder.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} size={args.size} "
          f"precision={args.precision} providers={args.providers} load1={load:.2f} vocabulary={len(vocab)}")
    print(f"{'segmenter':<11} {'torch ms':>9} {'ort ms':>8} {'ratio':>6} {'ort 1st ms':>10} {'labels =':>8} "
          f"{'export s':>8} {'attach s':>8}")
    for name in args.segmenters:
        keys = model_fields(name)
        import yaml

        overrides = random_weights(yaml.safe_load(args.options) if args.options else {}, keys)
        own = {f.name for f in dataclasses.fields(get_segmenter_class(name).config_cls)}
        if {"allow_random", "checkpoint"} <= own:  # FC-CLIP's own head weights
            overrides.update(allow_random=True, checkpoint="")
        for key in keys:
            overrides[key]["precision"] = args.precision
        try:
            seg = build_segmenter(name, args.preset, overrides, device)
            state = seg.encode_vocabulary(vocab)
            t0 = time.perf_counter()
            path = folder / f"{name}_{args.preset}_{args.precision}.onnx"
            static = seg.image_graph() is not None and seg.image_graph().static
            export_onnx(seg, path, preset=args.preset, camera_sizes=[] if args.dynamic and not static else [(h, w)])
            export_s = time.perf_counter() - t0
            providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
            opts = BackendOptions("onnxruntime", str(path), providers=providers, trt_fp16=args.precision == "fp16",
                                  trt_cache_dir=args.trt_cache or str(folder / "trt_cache"),
                                  device_id=(device.index or 0) if device.type == "cuda" else 0, trt_opt_size=(h, w))
            torch_seg = seg.segment(image, state)  # torch warm-up (and the reference labels)
            t0 = time.perf_counter()
            attach_onnx(seg, opts)  # TensorRT/CUDA: the engine is built (or loaded from the cache) here
            attach_s = time.perf_counter() - t0
            encoder = seg.image_encoder
            first = _once(lambda: seg.segment(image, state), device)
            ort_labels = seg.segment(image, state).labels
        except Exception as exc:  # noqa: BLE001  (one method must not stop the table)
            print(f"{name:<11} skipped: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        times: dict[str, list[float]] = {"torch": [], "ort": []}
        for _ in range(args.repeats):  # interleaved: both backends see the same load
            seg.image_encoder = None
            times["torch"].append(_once(lambda: seg.segment(image, state), device))
            seg.image_encoder = encoder
            times["ort"].append(_once(lambda: seg.segment(image, state), device))
        t, o = statistics.median(times["torch"]), statistics.median(times["ort"])
        agree = float((torch_seg.labels == ort_labels).mean())
        print(f"{name:<11} {t * 1000:9.1f} {o * 1000:8.1f} {t / o:6.2f} {first * 1000:10.1f} {agree:8.4f} "
              f"{export_s:8.1f} {attach_s:8.1f}")
        del seg, encoder
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load1 at the end={load:.2f}; files in {folder}")


if __name__ == "__main__":
    main()
