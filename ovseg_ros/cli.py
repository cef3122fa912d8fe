"""``ovseg-segment``: the offline command-line tool on the same core as the node.

Image files or folders in; per image a label PNG (uint8 while the vocabulary has <= 255 classes, else
uint16; 255/65535 = unlabeled, the node's convention), a colour PNG and a JSON sidecar out.

Video: a video file (anything OpenCV's ``VideoCapture`` reads: .mp4, .avi, .mkv, ...), or with ``--sequence`` a
folder of frames in name order (natural sort: frame2 before frame10), is segmented as one sequence with the node's
per-frame video stage (:class:`~ovseg_ros.core.video.VideoState`): the temporal filter (``--temporal-filter``)
and persistent instance ids - every segment in the per-frame JSON has a ``track_id`` (0 = untracked). Outputs go
to ``<output>/<sequence name>/<frame number>_*``; a sequence is always processed whole (its track ids depend on
every earlier frame).

Example::

    ovseg-segment photos/ -o out/ --segmenter itaclip --vocabulary floor chair "person, people" door
    ovseg-segment run.mp4 -o out/ --segmenter itaclip --temporal-filter vote     # tracks + filter
    ovseg-segment frames/ --sequence -o out/ --fps 15                            # an ordered folder of frames
    torchrun --nproc_per_node=4 -m ovseg_ros.cli photos/ -o out/ ...   # 4 processes share the images

Images whose outputs exist are skipped (``--overwrite`` redoes them), so a rerun continues where the last
one stopped. Under ``torchrun`` each process takes every N-th image and writes its own files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

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
from .tools import plain_help
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
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}
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


def natural_key(path: Path) -> list[Any]:
    """Sort key: digit runs compare as numbers (frame2 < frame10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def find_sequences(inputs: Sequence[str], folders: bool) -> tuple[list[Path], list[str]]:
    """(sequences, other inputs): video files always, folders when ``folders`` (``--sequence``)."""
    seqs, rest = [], []
    for item in inputs:
        p = Path(item)
        if (p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES) or (folders and p.is_dir()):
            seqs.append(p)
        else:
            rest.append(item)
    return seqs, rest


def read_sequence(source: Path, fps: float) -> Iterator[tuple[int, int, Optional[np.ndarray], str]]:
    """(frame number, stamp in ns, RGB image or None when unreadable, name) of each frame, in order.

    Stamps: the video's own (``CAP_PROP_POS_MSEC``) when it has them, else frame number / fps (the video's fps,
    or ``fps`` for a folder). Raises ImageError when a video cannot be opened.
    """
    if source.is_dir():
        files = sorted((q for q in source.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
        for i, f in enumerate(files):
            try:
                image: Optional[np.ndarray] = read_rgb(f)
            except ImageError:
                image = None
            yield i, int(round(i * 1e9 / fps)), image, f.name
        return
    cap = cv2.VideoCapture(str(source))
    if not cap.isOpened():
        raise ImageError(f"{source}: not a readable video")
    rate = cap.get(cv2.CAP_PROP_FPS) or fps
    rate = rate if 0 < rate < 10_000 else fps
    last = -1
    try:
        i = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            ms = cap.get(cv2.CAP_PROP_POS_MSEC)
            stamp = int(round(ms * 1e6)) if ms and ms > 0 else int(round(i * 1e9 / rate))
            stamp = max(stamp, last + 1)  # strictly increasing: a decoder glitch is not a clock jump
            last = stamp
            yield i, stamp, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), f"frame {i}"
            i += 1
    finally:
        cap.release()


def run_sequence(source: Path, segmenter: Any, vocabulary: Vocabulary, out_dir: Path, args: argparse.Namespace,
                 palette: np.ndarray) -> tuple[int, int]:
    """Segment one sequence with the node's video stage; (frames written, frames skipped)."""
    from .core.postprocess import panoptic_from_semantic
    from .core.temporal import FilterConfig
    from .core.video import VideoState

    video = VideoState()
    video.configure(not args.no_track, args.track_max_age,
                    FilterConfig(args.temporal_filter, args.temporal_frames, args.temporal_image_threshold))
    seq_dir = out_dir / (source.stem if source.is_file() else source.name)
    seq_dir.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    for index, stamp_ns, image, name in read_sequence(source, args.fps):
        if image is None:
            print(f"skipped {source} {name}: not a readable image", file=sys.stderr)
            skipped += 1
            continue
        t0 = time.perf_counter()
        try:
            result = segmenter.segment(image)
        except ImageError as exc:
            print(f"skipped {source} {name}: {exc}", file=sys.stderr)
            skipped += 1
            continue
        result = video.filter_result(result, image, stamp_ns, vocabulary.revision)
        panoptic = result.panoptic or panoptic_from_semantic(result.labels, result.confidence, vocabulary,
                                                             min_area=args.panoptic_min_area)
        tracks = video.track(panoptic, stamp_ns, vocabulary.revision)
        seconds = time.perf_counter() - t0
        result = dataclasses.replace(result, panoptic=panoptic)
        stem = seq_dir / f"{index:06d}"
        cv2.imwrite(f"{stem}_labels.png", encode_labels(result.labels, len(vocabulary)))
        cv2.imwrite(f"{stem}_color.png", cv2.cvtColor(colorize(result.labels, palette), cv2.COLOR_RGB2BGR))
        out = result_json(source, result, seconds, tracks)
        out.update({"frame": index, "frame_name": name, "stamp_s": stamp_ns / 1e9})
        Path(f"{stem}.json").write_text(json.dumps(out, indent=2))
        written += 1
    print(f"{source} -> {seq_dir}/ ({written} frames, {video.tracker.stats.created} tracks)")
    return written, skipped


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


def result_json(path: Path, result: SegmentationResult, seconds: float,
                track_ids: Optional[np.ndarray] = None) -> dict[str, Any]:
    vocab = result.vocabulary
    present, counts = np.unique(result.labels[result.labels != UNLABELED], return_counts=True)
    out: dict[str, Any] = {
        "image": str(path),
        "size": [int(result.labels.shape[1]), int(result.labels.shape[0])],
        "unlabeled_id": unlabeled_value(len(vocab)),
        # One run, one vocabulary: ids are positions (the node's stable ids matter only across changes).
        "class_ids": "positions",
        "classes": [{"id": i, "name": c.name, "synonyms": list(c.synonyms), "is_thing": c.is_thing}
                    for i, c in enumerate(vocab.classes)],
        "present": {vocab.classes[int(c)].name: int(n) for c, n in zip(present, counts)},
        "seconds": round(seconds, 4),
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
    }
    if result.panoptic is not None:
        out["segments"] = [
            {"id": s.id, "class_id": s.class_id, "class_name": vocab.classes[s.class_id].name,
             "is_thing": s.is_thing, "score": round(s.score, 4), "area": s.area, "bbox": list(s.bbox),
             **({"track_id": int(track_ids[k])} if track_ids is not None else {})}
            for k, s in enumerate(result.panoptic.segments)
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
    p = argparse.ArgumentParser(prog="ovseg-segment", description=plain_help(__doc__.split("\n\n")[0]),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files or folders")
    p.add_argument("-o", "--output", default="ovseg_out", help="output folder")
    add_model_arguments(p)
    p.add_argument("--query", nargs="+", metavar="TEXT",
                   help="free-form texts: write one mask per text (<name>_query<i>.png) and scores to <name>_query.json "
                        "instead of the semantic outputs (CaR answers in its referring mode)")
    add_cache_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist (default: skip them)")
    vid = p.add_argument_group("video (a video file, or a folder with --sequence)")
    vid.add_argument("--sequence", action="store_true", help="folders are ordered frame sequences (natural name order)")
    vid.add_argument("--fps", type=float, default=30.0, help="frame rate of a folder sequence (stamps), or of a "
                     "video that does not say")
    vid.add_argument("--no-track", action="store_true", help="no track ids (all 0)")
    vid.add_argument("--track-max-age", type=float, default=3.0, help="seconds a track not seen is kept")
    vid.add_argument("--temporal-filter", default="none", choices=["none", "vote"], help="temporal label filter")
    vid.add_argument("--temporal-frames", type=int, default=3, help="frames in the vote (1-7)")
    vid.add_argument("--temporal-image-threshold", type=int, default=10, help="colour change (0-255) that restarts "
                     "a pixel's vote")
    vid.add_argument("--panoptic-min-area", type=int, default=0, help="derived segments smaller than this get no id")
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
        sequences, others = find_sequences(args.inputs, args.sequence)
        if args.fps <= 0 or not np.isfinite(args.fps):
            raise ValueError(f"--fps must be a positive number, got {args.fps}")
        if not (args.track_max_age >= 0 and np.isfinite(args.track_max_age)):
            raise ValueError(f"--track-max-age must be a finite number >= 0, got {args.track_max_age}")
        from .core.temporal import FilterConfig

        FilterConfig(args.temporal_filter, args.temporal_frames, args.temporal_image_threshold)  # checks them
        images = shard(find_images(others), ctx)  # torchrun: every N-th image; else all
        sequences = shard(sequences, ctx)  # a sequence stays in one process (tracks span its frames)
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
    for source in sequences:
        if args.query:
            print(f"ovseg-segment: --query takes images, not the sequence {source}", file=sys.stderr)
            return 2
        try:
            written, skipped = run_sequence(source, segmenter, vocabulary, out_dir, args, palette)
        except ImageError as exc:
            print(f"skipped {source}: {exc}", file=sys.stderr)
            failures += 1
            continue
        if written == 0:
            failures += 1
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
    return 1 if failures and failures == len(images) + len(sequences) else 0


if __name__ == "__main__":
    sys.exit(main())
