"""CLIP-ES pseudo-masks for a folder of images: the input of the paper's third stage (training a segmenter).

Lin et al., "CLIP is Also an Efficient Segmenter", CVPR 2023 (arXiv 2212.09506),
https://github.com/linyq2117/CLIP-ES (``generate_cams_*.py`` + ``eval_cam_with_crf.py``). One PNG per image
in the PASCAL VOC convention: 0 background, class index + 1, 255 ignore (pixels whose CRF confidence is
below ``--ignore-below``, 0.95 as the authors), written as a paletted PNG with the VOC colour map.

Image-level tags are what CLIP-ES needs. Give them (``--tags`` file or ``--voc-annotations``) to reproduce
the weakly supervised setting, or leave them out to have them predicted per image by CLIP classification
(the segmenter's ``presence_threshold``/``max_present``). ``tags.json`` in the output folder records the
tags used for every image.

Examples::

    # VOC train with ground-truth tags from the XML annotations (the paper's setting)
    python -m ovseg_ros.tools.clipes_pseudo_labels VOC2012/JPEGImages --list train.txt \\
        --voc-annotations VOC2012/Annotations --dataset voc -o pseudo/
    # COCO with the authors' split file format ("stem id id ...", 0-based class ids)
    python -m ovseg_ros.tools.clipes_pseudo_labels train2014/ --dataset coco --tags coco14/train.txt -o out/
    # Your own classes, tags predicted
    python -m ovseg_ros.tools.clipes_pseudo_labels frames/ --classes "pallet" "forklift, lift truck" -o out/
    # 4 GPUs (or processes) share the images; each writes its own PNGs, rank 0 merges tags.json
    torchrun --nproc_per_node=4 -m ovseg_ros.tools.clipes_pseudo_labels VOC2012/JPEGImages ... -o pseudo/

Existing PNGs are skipped (``--overwrite`` redoes them), so a rerun continues where the last one stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import add_model_arguments, list_images, merge, model_overrides, parse_sets, read_rgb

log = logging.getLogger("clipes_pseudo_labels")

#: Dataset class names (as in annotations) and the prompt names CLIP-ES uses for them
#: (``clip_text.py``: synonyms comma-joined into one prompt, a few names replaced).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_PROMPT_NAMES = {"bird": "bird avian", "chair": "chair seat", "person": "person with clothes, people, human",
                    "tvmonitor": "tvmonitor screen"}
COCO_CLASSES = (
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "sofa",
    "pottedplant", "bed", "diningtable", "toilet", "tvmonitor", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
# The authors write 'sknowboard' (a typo); we keep 'snowboard'.
COCO_PROMPT_NAMES = {"person": "person with clothes, people, human", "bird": "bird avian",
                     "backpack": "backpack, bag", "umbrella": "umbrella, parasol", "handbag": "handbag, purse",
                     "tie": "necktie", "baseball glove": "glove", "spoon": "dessertspoon", "chair": "chair seat",
                     "tvmonitor": "tvmonitor screen", "remote": "remote control",
                     "hair drier": "hairdrier, blowdrier"}
DATASETS = {"voc": (VOC_CLASSES, VOC_PROMPT_NAMES), "coco": (COCO_CLASSES, COCO_PROMPT_NAMES)}


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), flattened for ``PIL.Image.putpalette``."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def dataset_vocabulary(name: str):
    """(vocabulary with the authors' prompt names, annotation class names in the same order)."""
    from ..core.vocabulary import Vocabulary

    classes, prompt_names = DATASETS[name]
    return Vocabulary.from_request([prompt_names.get(c, c) for c in classes], source=name), list(classes)


def read_tags(path: Path) -> dict[str, list[str]]:
    """Tags per image stem from JSON (``{stem: [name or id, ...]}``) or text lines ``stem tag tag ...``
    (the authors' COCO split format, 0-based ids; names with spaces need JSON)."""
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        return {str(k): [str(t) for t in v] for k, v in data.items()}
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if parts:
            out[parts[0]] = parts[1:]
    return out


def read_voc_annotation(path: Path) -> list[str]:
    """Object class names in a VOC XML annotation, first occurrence order, unique."""
    names: list[str] = []
    for obj in ET.parse(path).getroot().iter("object"):
        n = obj.findtext("name")
        if n and n.strip() not in names:
            names.append(n.strip())
    return names


class TagResolver:
    """Map tag strings (names, synonyms, dataset names or 0-based ids) to vocabulary class ids."""

    def __init__(self, vocabulary, tag_names: Optional[Sequence[str]] = None) -> None:
        self.size = len(vocabulary)
        self.lookup: dict[str, int] = {}
        for i, c in enumerate(vocabulary.classes):
            for n in c.names:
                self.lookup.setdefault(n.lower(), i)
        for i, n in enumerate(tag_names or ()):
            self.lookup[n.lower()] = i

    def __call__(self, tags: Sequence[str], image: str) -> list[int]:
        out: list[int] = []
        for t in tags:
            if t.isdigit():
                k = int(t)
                if k >= self.size:
                    raise ValueError(f"{image}: tag id {k} is out of range (0..{self.size - 1})")
            elif t.lower() in self.lookup:
                k = self.lookup[t.lower()]
            else:
                raise ValueError(f"{image}: tag {t!r} is not a class of the vocabulary")
            if k not in out:
                out.append(k)
        return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovseg_ros.tools.clipes_pseudo_labels",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", required=True, help="output folder for <stem>.png and tags.json")
    v = p.add_argument_group("classes (one of)")
    v.add_argument("--dataset", choices=sorted(DATASETS),
                   help="built-in VOC/COCO classes with the authors' prompt names")
    v.add_argument("--vocabulary", help="vocabulary YAML file (classes: ...)")
    v.add_argument("--classes", nargs="+", help='class entries, "name, synonym, ..."')
    t = p.add_argument_group("tags (optional; predicted per image when absent)")
    t.add_argument("--tags", help="JSON {stem: [names|ids]} or text lines 'stem id id ...'")
    t.add_argument("--voc-annotations", help="folder of VOC XML annotations (<stem>.xml)")
    t.add_argument("--skip-untagged", action="store_true", help="skip images without tags instead of predicting")
    p.add_argument("--list", help="text file of image stems to process (e.g. VOC train.txt)")
    p.add_argument("--preset", default="",
                   help="clip_es preset (default: coco for --dataset coco, else voc)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="segmenter option override, repeatable (e.g. --set crf_max_side=512)")
    p.add_argument("--ignore-below", type=float, default=None,
                   help="confidence under which pixels are 255 (default: the preset's, 0.95)")
    p.add_argument("--limit", type=int, default=0, help="process at most this many images")
    p.add_argument("--overwrite", action="store_true", help="recompute existing PNGs")
    add_model_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    import torch

    from ..core.segmenter import build_segmenter
    from ..eval import distributed as dist
    from ..core.vocabulary import Vocabulary, load_vocabulary_file

    if sum(x is not None for x in (args.dataset, args.vocabulary, args.classes)) != 1:
        print("error: give exactly one of --dataset, --vocabulary, --classes", file=sys.stderr)
        return 2
    tag_names: Optional[list[str]] = None
    if args.dataset:
        vocabulary, tag_names = dataset_vocabulary(args.dataset)
    elif args.vocabulary:
        vocabulary = load_vocabulary_file(args.vocabulary)
    else:
        vocabulary = Vocabulary.from_request(args.classes, source="cli")
    if len(vocabulary) > 254:
        print("error: VOC-style PNGs hold at most 254 classes", file=sys.stderr)
        return 2
    resolve = TagResolver(vocabulary, tag_names)
    given = read_tags(Path(args.tags)) if args.tags else {}
    images = list_images(args.images)
    if args.list:
        wanted = {s.strip().split()[0] for s in Path(args.list).read_text().splitlines() if s.strip()}
        images = [im for im in images if im.stem in wanted]
    if args.limit > 0:
        images = images[: args.limit]
    try:
        ctx, device = dist.init(args.device)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    images = dist.shard(images, ctx)  # torchrun: every N-th image; one process: all
    preset = args.preset or (args.dataset if args.dataset in ("voc", "coco") else "voc")
    overrides = merge(model_overrides(args), parse_sets(args.sets))
    seg = build_segmenter("clip_es", preset, overrides, device=device,
                          cache_dir=args.cache_dir, offline=not args.online)
    state = seg.encode_vocabulary(vocabulary)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged_path = out_dir / "tags.json"
    # Each process keeps its own record file; rank 0 merges them into tags.json at the end.
    record_path = merged_path if not ctx.distributed else out_dir / f"tags.{ctx.tag}.json"
    record: dict[str, dict] = json.loads(record_path.read_text()) if record_path.is_file() else {}
    palette = voc_palette()
    from PIL import Image

    t0, done = time.perf_counter(), 0
    for path in images:
        target = out_dir / f"{path.stem}.png"
        if target.exists() and not args.overwrite:
            continue
        tags: Optional[list[str]] = given.get(path.stem)
        if tags is None and args.voc_annotations:
            xml = Path(args.voc_annotations) / f"{path.stem}.xml"
            tags = read_voc_annotation(xml) if xml.is_file() else None
        if tags is None and args.skip_untagged:
            log.info("%s: no tags, skipped", path.name)
            continue
        present = resolve(tags, path.name) if tags is not None else None
        image = read_rgb(path)
        with torch.no_grad():
            maps = seg.compute_maps(image, state, present)
        thr = seg.config.ignore_below if args.ignore_below is None else args.ignore_below
        png = seg.maps_to_pseudo_label(maps, thr)
        im = Image.fromarray(png, mode="P")
        im.putpalette(palette)
        im.save(target)
        used = sorted({int(v) - 1 for v in np.unique(png) if 0 < v < 255})
        record[path.stem] = {"tags": [vocabulary.classes[k].name for k in maps.present],
                             "predicted": present is None,
                             "labels_in_mask": [vocabulary.classes[k].name for k in used]}
        done += 1
        log.info("%s -> %s (%s)", path.name, target.name,
                 ", ".join(record[path.stem]["labels_in_mask"]) or "background")
    record_path.write_text(json.dumps(record, indent=1, sort_keys=True))
    dist.barrier(ctx)
    if ctx.distributed and ctx.is_main:
        merged: dict[str, dict] = json.loads(merged_path.read_text()) if merged_path.is_file() else {}
        for part in sorted(out_dir.glob("tags.rank*.json")):
            merged.update(json.loads(part.read_text()))
        merged_path.write_text(json.dumps(merged, indent=1, sort_keys=True))
    dist.finish(ctx)
    dt = time.perf_counter() - t0
    print(f"{'' if not ctx.distributed else f'rank {ctx.rank}: '}wrote {done} pseudo-label PNGs to {out_dir} in {dt:.1f} s"
          + (f" ({dt / done:.2f} s/image)" if done else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
