#!/usr/bin/env python3
"""FC-CLIP latency per stage and peak memory at robot input sizes and at the paper's 800-pixel short side.

Speed does not depend on weight values, so unless ``--checkpoint`` is given the real architecture
(convnext_large_d_320 + the authors' head: 250 queries, 6 encoder / 9 decoder layers) is built with random
weights; ``--arch narrow`` uses the test architecture (tiny ConvNeXt, 32 channels) for CI-sized runs.

For each input size (H x W of the camera frame) and each resize rule (``native``: the frame as is, padded to
32; ``800``: the authors' shortest edge 800 / long side <= 1333), it reports the network input size, the
median time of every stage of ``segment()`` (preprocess, backbone, pixel_decoder, decoder incl. the class
heads and ensemble, postprocess = mask upsampling + semantic + panoptic), the total, one bare backbone
forward at the same input and the ratio total / backbone, and peak memory (CUDA: max allocated; CPU: the
process's peak RSS so far, which only grows).

    python benchmarks/bench_fcclip.py --arch narrow                                # seconds
    python benchmarks/bench_fcclip.py --sizes 480x640 720x1280 --resize native 800 --repeats 2
    python benchmarks/bench_fcclip.py --device cuda --checkpoint fcclip_cocopan.pth --json fcclip.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from benchlib import timed  # noqa: E402  (also puts the repository root on sys.path)

from ovseg_ros.core.models import resolve_device  # noqa: E402
from ovseg_ros.core.segmenter import build_segmenter  # noqa: E402
from ovseg_ros.core.vocabulary import Vocabulary  # noqa: E402

#: A robot scene: COCO things and stuff plus a few unseen classes.
CLASSES = ["person", "chair", "table", "door", "floor", "wall", "cup", "bottle", "laptop", "shelf", "forklift",
           "pallet", "cardboard box", "potted plant", "ceiling", "window"]
NARROW_ARCH = {"hidden_dim": 32, "mask_dim": 32, "num_queries": 12, "dec_layers": 3, "dec_heads": 2,
               "dec_ffn_dim": 64, "enc_layers": 2, "enc_heads": 2, "enc_points": 2, "enc_ffn_dim": 64}
RESIZE = {"native": (0, 0), "800": (800, 1333), "640": (640, 1138), "480": (480, 864)}
STAGES = ("preprocess", "backbone", "pixel_decoder", "decoder", "postprocess")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def random_state(seg: Any, vocab: Vocabulary) -> Any:
    """A vocabulary state with random unit text embeddings, built like ``encode_vocabulary`` otherwise."""
    from ovseg_ros.core.fcclip.coco_panoptic import seen_mask
    from ovseg_ros.core.segmenters.fcclip import FCCLIPState

    names, owner = vocab.query_names()
    dim = seg.network.model.backbone.embed_dim
    text = torch.nn.functional.normalize(torch.randn(len(names), dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    return FCCLIPState(vocabulary=vocab, text=text, owner=torch.tensor(owner),
                       seen=torch.tensor(seen_mask([c.names for c in vocab.classes])),
                       is_thing=torch.tensor(seg._thing_flags(vocab)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("full", "narrow"), default="full")
    ap.add_argument("--sizes", nargs="+", default=["480x640", "720x1280"], help="camera frames, HxW")
    ap.add_argument("--resize", nargs="+", default=["native", "800"], choices=sorted(RESIZE))
    ap.add_argument("--classes", type=int, default=len(CLASSES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", help="CLIP precision (auto = fp16 on CUDA)")
    ap.add_argument("--checkpoint", default="", help="fcclip_cocopan.pth (else random weights)")
    ap.add_argument("--cache-dir", default="")
    ap.add_argument("--encode-text", action="store_true", help="encode the vocabulary even with random weights")
    ap.add_argument("--semantic-source", default="semantic", choices=("semantic", "panoptic"))
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    overrides: dict[str, Any] = {"model": {"precision": args.precision}, "semantic_source": args.semantic_source}
    if args.checkpoint:
        overrides["checkpoint"] = args.checkpoint
    else:
        overrides["allow_random"] = True
        overrides["model"]["pretrained"] = ""
    if args.arch == "narrow":
        overrides["model"]["name"] = "ovseg-tiny-convnext"
        overrides["arch"] = NARROW_ARCH
    t0 = time.perf_counter()
    base = build_segmenter("fcclip", "coco_panoptic", overrides, device=device, cache_dir=args.cache_dir)
    load_s = time.perf_counter() - t0
    names = [CLASSES[i % len(CLASSES)] + ("" if i < len(CLASSES) else f" {i}") for i in range(args.classes)]
    vocab = Vocabulary.from_request(names)
    t0 = time.perf_counter()
    if args.checkpoint or args.encode_text:
        state = base.encode_vocabulary(vocab)
        text = f"{len(names)} classes x 14 templates encoded in {time.perf_counter() - t0:.1f} s"
    else:  # random weights: text values do not change the timing, and the large text tower is slow on a CPU
        state = random_state(base, vocab)
        text = f"{len(names)} classes with random text embeddings (--encode-text to run the text tower)"
    print(f"fcclip {args.arch} on {device} ({torch.get_num_threads()} threads): load {load_s:.1f} s, {text}")
    header = f"{'frame':>9} {'resize':>6} {'input':>9} " + " ".join(f"{s[:9]:>9}" for s in STAGES)
    print(header + f" {'total':>8} {'backbone1':>9} {'ratio':>6} {'peak MB':>8}   (ms)")
    rows = []
    rng = np.random.default_rng(0)
    for size in args.sizes:
        h, w = (int(v) for v in size.lower().split("x"))
        image = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        for rule in args.resize:
            min_size, max_size = RESIZE[rule]
            seg = build_segmenter("fcclip", "coco_panoptic", {**overrides, "min_size": min_size, "max_size": max_size},
                                  device=device, model=base.network)
            x, _ = seg._prepare(image)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seg.segment(image, state)  # warm-up (kernels, resize tables)
            stage_runs = []

            def run() -> None:
                stage_runs.append(seg.segment(image, state).timings)

            total = timed(run, args.repeats, device, warmup=0)
            backbone = timed(lambda: seg.backbone_forward(image), args.repeats, device, warmup=0)
            stages = {s: statistics.median(r.get(s, 0.0) for r in stage_runs) for s in STAGES}
            row = {"frame": size, "resize": rule, "input": f"{x.shape[-2]}x{x.shape[-1]}",
                   "stages_ms": {k: v * 1e3 for k, v in stages.items()}, "total_ms": total * 1e3,
                   "backbone_ms": backbone * 1e3, "ratio": total / backbone, "peak_mb": peak_memory_mb(device)}
            rows.append(row)
            print(f"{size:>9} {rule:>6} {row['input']:>9} "
                  + " ".join(f"{row['stages_ms'][s]:9.0f}" for s in STAGES)
                  + f" {row['total_ms']:8.0f} {row['backbone_ms']:9.0f} {row['ratio']:6.2f} {row['peak_mb']:8.0f}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "device": str(device), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
