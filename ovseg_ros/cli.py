"""``ovseg-segment``: the offline command-line tool on the same core as the node.

Image files or folders in; per image a label PNG (uint8 while the vocabulary has <= 255 classes, else
uint16; 255/65535 = unlabeled, the node's convention), a colour PNG and a JSON sidecar out.

Example::

    ovseg-segment photos/ -o out/ --segmenter itaclip --vocabulary floor chair "person, people" door
    torchrun --nproc_per_node=4 -m ovseg_ros.cli photos/ -o out/ ...   # 4 processes share the images

Images whose outputs exist are skipped (``--overwrite`` redoes them), so a rerun continues where the last
one stopped. Under ``torchrun`` each process takes every N-th image and writes its own files.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np

from .core.deploy import DeployError, add_backend_arguments, backend_from_args
from .core.untrusted import load_yaml
from .core.models import ModelLoadError
from .core.postprocess import colorize, make_palette
from .core.segmenter import (
    ImageError,
    QueryResult,
    SegmentationResult,
    build_segmenter,
    list_presets,
    list_segmenters,
)
from .core.vocabulary import (
    UNLABELED,
    Vocabulary,
    VocabularyError,
    find_vocabulary_preset,
    list_vocabulary_presets,
    load_vocabulary_file,
)

log = logging.getLogger("ovseg_segment")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
#: The CLI runs the authors' settings by default (the node defaults to ``realtime``).
PAPER_PRESETS = {"dense_clip": "default", "itaclip": "voc21", "clip_es": "voc", "car": "voc", "fcclip": "coco_panoptic"}


def unlabeled_value(num_classes: int) -> int:
    """255 while ids fit mono8 (<= 255 classes), 65535 beyond: the vision_msgs 'max = unlabeled' rule."""
    return 255 if num_classes <= 255 else 65535


def encode_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Core labels (int32, -1 = unlabeled) -> uint8/uint16 with the unlabeled value."""
    dtype = np.uint8 if num_classes <= 255 else np.uint16
    out = labels.astype(dtype)
    out[labels == UNLABELED] = unlabeled_value(num_classes)
    return out


def find_images(inputs: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"input {item!r} is neither a file nor a folder")
    return found


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError(f"{path}: not a readable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def resolve_vocabulary(args: argparse.Namespace) -> Vocabulary:
    if args.vocabulary:
        return Vocabulary.from_request(args.vocabulary, source="command line")
    if args.vocabulary_file:
        return load_vocabulary_file(args.vocabulary_file)
    path = find_vocabulary_preset(args.vocabulary_preset)
    if path is None:
        raise VocabularyError(f"unknown vocabulary preset {args.vocabulary_preset!r}; available: "
                              f"{', '.join(list_vocabulary_presets()) or 'none'}")
    return load_vocabulary_file(path)


def result_json(path: Path, result: SegmentationResult, seconds: float) -> dict[str, Any]:
    vocab = result.vocabulary
    present, counts = np.unique(result.labels[result.labels != UNLABELED], return_counts=True)
    out: dict[str, Any] = {
        "image": str(path),
        "size": [int(result.labels.shape[1]), int(result.labels.shape[0])],
        "unlabeled_id": unlabeled_value(len(vocab)),
        "classes": [{"id": i, "name": c.name, "synonyms": list(c.synonyms), "is_thing": c.is_thing}
                    for i, c in enumerate(vocab.classes)],
        "present": {vocab.classes[int(c)].name: int(n) for c, n in zip(present, counts)},
        "seconds": round(seconds, 4),
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
    }
    if result.panoptic is not None:
        out["segments"] = [
            {"id": s.id, "class_id": s.class_id, "class_name": vocab.classes[s.class_id].name,
             "is_thing": s.is_thing, "score": round(s.score, 4), "area": s.area, "bbox": list(s.bbox)}
            for s in result.panoptic.segments
        ]
    return out


def write_query(stem: Path, path: Path, result: QueryResult) -> None:
    """One 0/255 mask PNG per text and a JSON with the texts, scores and mask file names."""
    entries = []
    for i, (text, mask, score) in enumerate(zip(result.texts, result.masks, result.scores)):
        name = f"{stem.name}_query{i}.png"
        cv2.imwrite(str(stem.parent / name), mask.astype(np.uint8) * 255)
        entries.append({"text": text, "score": round(float(score), 4), "mask": name, "area": int(mask.sum())})
    Path(f"{stem}_query.json").write_text(json.dumps({"image": str(path), "queries": entries}, indent=2))


def add_model_arguments(p: argparse.ArgumentParser, segmenter: str = "dense_clip",
                        preset_help: str = "method preset; default: the paper settings") -> None:
    """The segmenter, model, device and vocabulary options shared by the offline tools (ovseg-segment, ovseg-bag)."""
    p.add_argument("--segmenter", default=segmenter, help="segmentation method (--list shows them)")
    p.add_argument("--preset", default="", help=preset_help)
    p.add_argument("--model", default="", help="open_clip architecture (overrides the preset)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (overrides the preset)")
    p.add_argument("--checkpoint", default="", help="local weights file (wins over --pretrained)")
    p.add_argument("--precision", default="", choices=["", "auto", "fp32", "fp16", "bf16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--options", default="", help="YAML/JSON mapping of method options merged onto the preset")
    add_vocabulary_arguments(p)


def add_vocabulary_arguments(p: argparse.ArgumentParser) -> None:
    voc = p.add_mutually_exclusive_group()
    voc.add_argument("--vocabulary", nargs="+", help='class names, each "name, synonym, ..."')
    voc.add_argument("--vocabulary-file", help="vocabulary YAML (classes: [...])")
    voc.add_argument("--vocabulary-preset", default="indoor_robot", help="a file stem in config/vocabularies")


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default="~/.cache/ovseg_ros", help="text-embedding and weights cache")
    p.add_argument("--online", action="store_true", help="allow downloading weights from the hub")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ovseg-segment", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files or folders")
    p.add_argument("-o", "--output", default="ovseg_out", help="output folder")
    add_model_arguments(p)
    p.add_argument("--query", nargs="+", metavar="TEXT",
                   help="free-form texts: write one mask per text (<name>_query<i>.png) and scores to <name>_query.json "
                        "instead of the semantic outputs (CaR answers in its referring mode)")
    add_cache_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist (default: skip them)")
    p.add_argument("--list", action="store_true", help="list segmenters and presets, then exit")
    p.add_argument("-v", "--verbose", action="store_true")
    add_backend_arguments(p, "--backend")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.list:
        for name in list_segmenters():
            print(f"{name}: presets {', '.join(list_presets(name)) or '-'}")
        return 0
    if not args.inputs:
        print("ovseg-segment: give image files or folders (or --list)", file=sys.stderr)
        return 2
    from .core.models import resolve_device
    from .eval.distributed import DistContext, env_world, shard

    try:
        rank, world, local_rank = env_world()
        ctx = DistContext(rank, world, local_rank)
        images = shard(find_images(args.inputs), ctx)  # torchrun: every N-th image; else all
        vocabulary = resolve_vocabulary(args)
        overrides: dict[str, Any] = load_yaml(args.options, "--options") if args.options else {}
        if not isinstance(overrides, dict):
            raise ValueError("--options must be a mapping")
        model = {k: v for k, v in (("name", args.model), ("pretrained", args.pretrained),
                                   ("checkpoint", args.checkpoint), ("precision", args.precision)) if v not in ("", None)}
        if model:
            from .core.segmenter import get_segmenter_class

            field = get_segmenter_class(args.segmenter).primary_model_field
            overrides[field] = {**overrides.get(field, {}), **model}
        preset = args.preset or PAPER_PRESETS.get(args.segmenter, "")
        if preset and preset not in list_presets(args.segmenter):
            preset = ""
        device = resolve_device(args.device)
        if ctx.distributed and device.type == "cuda" and args.device in ("auto", "cuda"):
            import torch

            device = torch.device("cuda", local_rank % torch.cuda.device_count())  # one GPU per process
        cache = str(Path(args.cache_dir).expanduser())
        segmenter = build_segmenter(args.segmenter, preset, overrides, device, cache_dir=cache, offline=not args.online,
                                    backend=backend_from_args(args, device))
        segmenter.set_vocabulary(vocabulary)
    except (DeployError, ModelLoadError, VocabularyError, FileNotFoundError, KeyError, TypeError, ValueError) as exc:
        print(f"ovseg-segment: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    palette = make_palette(len(vocabulary))
    failures = 0
    for path in images:
        stem = out_dir / path.stem
        marker = Path(f"{stem}_query.json" if args.query else f"{stem}.json")  # written last: complete
        if marker.exists() and not args.overwrite:
            continue
        try:
            image = read_rgb(path)
            if args.query:
                write_query(stem, path, segmenter.query(image, args.query))
                print(f"{path} -> {stem}_query.json")
                continue
            t0 = time.perf_counter()
            result = segmenter.segment(image)
            seconds = time.perf_counter() - t0
        except ImageError as exc:
            print(f"skipped {path}: {exc}", file=sys.stderr)
            failures += 1
            continue
        except VocabularyError as exc:  # e.g. a query text longer than the model's context
            print(f"ovseg-segment: {exc}", file=sys.stderr)
            return 2
        cv2.imwrite(f"{stem}_labels.png", encode_labels(result.labels, len(vocabulary)))
        cv2.imwrite(f"{stem}_color.png", cv2.cvtColor(colorize(result.labels, palette), cv2.COLOR_RGB2BGR))
        Path(f"{stem}.json").write_text(json.dumps(result_json(path, result, seconds), indent=2))
        print(f"{path} -> {stem}_labels.png ({seconds * 1000:.0f} ms)")
    return 1 if failures and failures == len(images) else 0


if __name__ == "__main__":
    sys.exit(main())
