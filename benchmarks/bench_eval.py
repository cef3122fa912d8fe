#!/usr/bin/env python3
"""Speed of ``ovseg-eval``: images/s of each segmenter's paper preset vs its realtime preset, and the
scaling of a 2-process torch.distributed (gloo) run on CPU.

Real architectures with random weights (speed does not depend on weight values; nothing is downloaded),
on small synthetic datasets written in the paper preset's layout (VOC for the semantic methods, COCO
panoptic with the 133 COCO classes for FC-CLIP), through the same loop as the command (reading, segmenting,
scoring, per-image records). Images are VOC-sized (375x500) by default: most presets resize to their own
processing size, but CLIP-ES's and CaR's paper presets run at the original size, so a smaller image would flatter
them. Vocabulary encoding runs once, before the loop, and is reported apart; to keep
it short on a CPU the prompt templates are cut to one (``--all-templates`` keeps them): the per-image cost
depends on the number of classes, not on the number of templates averaged into each class embedding.

    python benchmarks/bench_eval.py                       # every segmenter, 2 images each, then the scaling run
    python benchmarks/bench_eval.py --images 1 --no-warmup --skip-scaling   # the figures in docs/benchmarks.md
    python benchmarks/bench_eval.py --segmenters dense_clip clip_es --images 4
    python benchmarks/bench_eval.py --skip-presets --scaling-images 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
from benchlib import ROOT  # noqa: E402  (also puts the repository root on sys.path)
from bench_segmenters import model_fields, random_weights  # noqa: E402

import torch  # noqa: E402

from ovseg_ros.core.segmenter import build_segmenter, get_segmenter_class, load_paper_results  # noqa: E402
from ovseg_ros.eval import distributed as dist  # noqa: E402
from ovseg_ros.eval.datasets import open_dataset  # noqa: E402
from ovseg_ros.eval.runner import prepare_output, run_evaluation  # noqa: E402

#: (segmenter, paper preset, its dataset) - the preset each paper's headline number comes from.
PAPER = [("dense_clip", "default", "voc"), ("itaclip", "voc21", "voc"), ("clip_es", "voc", "voc"),
         ("car", "voc", "voc"), ("fcclip", "coco_panoptic", "coco_panoptic")]


def write_voc(root: Path, n: int, h: int, w: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    stems = [f"{i:06d}" for i in range(n)]
    for s in stems:
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{s}.jpg")
        Image.fromarray(rng.integers(0, 21, (h, w), dtype=np.uint8)).save(root / "SegmentationClass" / f"{s}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(stems) + "\n")


def write_coco_panoptic(root: Path, n: int, h: int, w: int) -> None:
    """The 133 COCO panoptic classes (ids 1..133 here), one thing and one stuff segment per image."""
    import yaml
    from PIL import Image

    from ovseg_ros.core.vocabulary import find_vocabulary_preset

    classes = yaml.safe_load(find_vocabulary_preset("coco_panoptic").read_text())["classes"]
    cats = [{"id": i + 1, "name": c["name"], "isthing": int(c.get("is_thing", True))} for i, c in enumerate(classes)]
    rng = np.random.default_rng(0)
    for d in ("val2017", "panoptic_val2017", "annotations"):
        (root / d).mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        stem = f"{i:012d}"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "val2017" / f"{stem}.jpg")
        ids = np.ones((h, w), np.uint8)
        ids[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 2
        Image.fromarray(np.stack([ids, ids * 0, ids * 0], -1)).save(root / "panoptic_val2017" / f"{stem}.png")
        images.append({"id": i, "file_name": f"{stem}.jpg", "height": h, "width": w})
        anns.append({"image_id": i, "file_name": f"{stem}.png", "segments_info": [
            {"id": 1, "category_id": 120, "iscrowd": 0}, {"id": 2, "category_id": 1, "iscrowd": 0}]})
    (root / "annotations" / "panoptic_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))


#: One template instead of the presets' ensembles (encoding time only; see the module docstring).
ONE_TEMPLATE = {"dense_clip": {"templates": "photo"}, "itaclip": {"templates": "photo"},
                "car": {"templates": ["a photo of a {}."]}}


def random_overrides(segmenter: str, one_template: bool = True) -> dict:
    overrides = random_weights(dict(ONE_TEMPLATE.get(segmenter, {})) if one_template else {}, model_fields(segmenter))
    own = {f.name for f in dataclasses.fields(get_segmenter_class(segmenter).config_cls)}
    if {"allow_random", "checkpoint"} <= own:  # FC-CLIP's own trained head
        overrides.update(allow_random=True, checkpoint="")
    for key in model_fields(segmenter):
        overrides[key]["precision"] = "fp32"
    return overrides


def bench_preset(segmenter: str, preset: str, dataset_root: Path, dataset: str, n: int, work: Path,
                 one_template: bool = True, warmup: bool = True) -> dict:
    ds = open_dataset(dataset, dataset_root)
    t0 = time.perf_counter()
    seg = build_segmenter(segmenter, preset, random_overrides(segmenter, one_template), "cpu",
                          cache_dir=str(work / "cache"))
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = seg.encode_vocabulary(ds.vocabulary)
    encode = time.perf_counter() - t0
    if warmup:
        seg.segment(ds.load_image(0), state)  # allocations, lazy initialisation
    out = work / f"{segmenter}-{preset}"
    run = {"segmenter": segmenter, "preset": preset, "overrides": {}, "dataset": dataset, "root": str(dataset_root),
           "num_classes": ds.num_classes}
    ctx = dist.DistContext()
    prepare_output(out, run, ctx, overwrite=True)
    # run_evaluation encodes the vocabulary again: give it the cached state instead.
    seg.encode_vocabulary = lambda vocabulary, _s=state: _s  # type: ignore[method-assign]
    t0 = time.perf_counter()
    totals = run_evaluation(seg, ds, out, ctx, limit=n, progress=False)
    wall = time.perf_counter() - t0
    per_image = [im["seconds"] for im in totals.images]
    return {"segmenter": segmenter, "preset": preset, "dataset": dataset, "images": len(per_image),
            "classes": len(ds.vocabulary), "build_s": build, "encode_s": encode, "wall_s": wall,
            "images_per_s": len(per_image) / wall, "segment_s_median": float(np.median(per_image))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_scaling(root: Path, work: Path, segmenter: str, preset: str) -> list[dict]:
    """The command itself on 1 process and on 2 gloo processes (1 thread each), same dataset and settings."""
    common = ["-m", "ovseg_ros.eval", "--segmenter", segmenter, "--preset", preset, "--dataset", "voc",
              "--root", str(root), "--device", "cpu", "--no-progress", "--cache-dir", str(work / "cache"),
              "--options", json.dumps({**ONE_TEMPLATE.get(segmenter, {}), "model": {
                  "pretrained": "", "checkpoint": "", "allow_random": True, "precision": "fp32"}})]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    rows = []
    # A first run fills the text-embedding cache so neither measured run encodes text.
    subprocess.run([sys.executable] + common + ["-o", str(work / "warm"), "--limit", "1"], env=env, check=True,
                   capture_output=True)
    for procs in (1, 2):
        out = work / f"scale{procs}"
        launcher = [sys.executable] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}"]
        t0 = time.perf_counter()
        done = subprocess.run(launcher + common + ["-o", str(out)], env=env, capture_output=True, text=True)
        total = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        speed = json.loads((out / "report.json").read_text())["speed"]
        rows.append({"processes": procs, "images": speed["images_this_run"], "loop_s": speed["wall_seconds_this_run"],
                     "images_per_s": speed["images_per_second_this_run"], "command_s": total})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--segmenters", nargs="*", default=[s for s, _, _ in PAPER])
    ap.add_argument("--images", type=int, default=2, help="images per preset (after one warm-up image)")
    ap.add_argument("--no-warmup", action="store_true", help="no untimed first image (slow presets: it is noise)")
    ap.add_argument("--size", default="375x500", help="HxW of the synthetic images")
    ap.add_argument("--all-templates", action="store_true", help="encode the presets' full template sets")
    ap.add_argument("--skip-presets", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--scaling-images", type=int, default=8)
    ap.add_argument("--scaling-segmenter", default="dense_clip")
    ap.add_argument("--scaling-preset", default="realtime")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    h, w = (int(v) for v in args.size.split("x"))
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} images {args.size}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_presets:
            write_voc(work / "voc", args.images, h, w)
            write_coco_panoptic(work / "coco", args.images, h, w)
            print(f"{'segmenter':<11} {'preset':<14} {'dataset':<14} {'classes':>7} {'build s':>8} {'encode s':>9} "
                  f"{'s/image':>8} {'images/s':>9} {'paper/realtime':>15}")
            for segmenter, paper_preset, dataset in sorted(
                    (p for p in PAPER if p[0] in args.segmenters), key=lambda p: args.segmenters.index(p[0])):
                rows = {}
                for preset in (paper_preset, "realtime"):
                    root = work / ("coco" if dataset == "coco_panoptic" else "voc")
                    try:
                        rows[preset] = r = bench_preset(segmenter, preset, root, dataset, args.images, work,
                                                             not args.all_templates, not args.no_warmup)
                    except Exception as exc:  # one method must not stop the table
                        print(f"{segmenter:<11} {preset:<14} skipped: {type(exc).__name__}: {exc}")
                        continue
                    ratio = ""
                    if preset == "realtime" and paper_preset in rows:
                        ratio = f"{r['images_per_s'] / rows[paper_preset]['images_per_s']:.1f}x faster"
                    print(f"{segmenter:<11} {preset:<14} {dataset:<14} {r['classes']:>7} {r['build_s']:8.1f} "
                          f"{r['encode_s']:9.1f} {r['segment_s_median']:8.2f} {r['images_per_s']:9.3f} {ratio:>15}",
                          flush=True)
                paper = load_paper_results(segmenter, paper_preset)
                if paper:
                    print(f"{'':<11} paper: " + ", ".join(f"{e['metric']} {e['value']}" for e in paper))
        if not args.skip_scaling:
            write_voc(work / "scale_voc", args.scaling_images, h, w)
            rows = bench_scaling(work / "scale_voc", work, args.scaling_segmenter, args.scaling_preset)
            print(f"\nscaling: ovseg-eval {args.scaling_segmenter}/{args.scaling_preset} on {args.scaling_images} "
                  f"images, 1 thread per process, gloo on loopback")
            print(f"{'processes':>9} {'loop s':>7} {'images/s':>9} {'speed-up':>9} {'command s':>10}")
            for r in rows:
                print(f"{r['processes']:>9} {r['loop_s']:7.2f} {r['images_per_s']:9.2f} "
                      f"{r['images_per_s'] / rows[0]['images_per_s']:9.2f} {r['command_s']:10.1f}")


if __name__ == "__main__":
    main()
