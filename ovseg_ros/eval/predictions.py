"""``--save-predictions``: each image's prediction as PNGs in the dataset's own id space.

``<output>/predictions/semantic/<id>.png``: the predicted label of every pixel, written with the values the
dataset's annotation files use (VOC 0-20, ADE20K 1-150, Context-59 1-59, COCO panoptic category ids, ...),
so a prediction compares directly with its annotation file. Pixels the segmenter left without a class
("no class": a miss of the true class, nobody's false positive) hold :data:`NO_CLASS_8` (255) in 8-bit
PNGs, used while every label value is below 255, else :data:`NO_CLASS_16` (65535) in 16-bit PNGs.
``predictions/meta.json`` says which, and lists the classes with their values.

On panoptic datasets also ``predictions/panoptic/<id>.png`` (segment ids in COCO's RGB encoding,
id = R + 256 G + 256² B, 0 = no segment) and ``<id>.json`` (``segments_info``: id, category_id, iscrowd 0),
the COCO panoptic prediction format that ``panopticapi`` reads.

Files are written atomically before the image's record, so an interrupted run never leaves a record whose
prediction file is missing or cut; a rerun with ``--save-predictions`` redoes images without their files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from .datasets import Dataset

PREDICTIONS = "predictions"
NO_CLASS_8 = 255
NO_CLASS_16 = 65535


def no_class_value(dataset: Dataset) -> int:
    values = dataset.raw_label_values()
    return NO_CLASS_8 if int(np.max(values)) < NO_CLASS_8 else NO_CLASS_16


def semantic_path(out_dir: Path, sample_id: str) -> Path:
    return out_dir / PREDICTIONS / "semantic" / f"{sample_id}.png"


def panoptic_paths(out_dir: Path, sample_id: str) -> tuple[Path, Path]:
    base = out_dir / PREDICTIONS / "panoptic" / sample_id
    return base.with_name(base.name + ".png"), base.with_name(base.name + ".json")


def is_saved(out_dir: Path, dataset: Dataset, sample_id: str) -> bool:
    paths = [semantic_path(out_dir, sample_id)]
    if dataset.kind == "panoptic":
        paths += list(panoptic_paths(out_dir, sample_id))
    return all(p.is_file() for p in paths)


def write_meta(out_dir: Path, dataset: Dataset) -> None:
    values = dataset.raw_label_values()
    meta = {"dataset": dataset.name, "no_class": no_class_value(dataset),
            "classes": [{"name": n, "value": int(v)} for n, v in zip(dataset.class_names, values)],
            "semantic": "predictions/semantic/<id>.png",
            "panoptic": "predictions/panoptic/<id>.png + <id>.json" if dataset.kind == "panoptic" else None}
    folder = out_dir / PREDICTIONS
    folder.mkdir(parents=True, exist_ok=True)
    _atomic(folder / "meta.json", json.dumps(meta, indent=1).encode())


def save(out_dir: Path, dataset: Dataset, sample_id: str, labels: np.ndarray,
         panoptic: Optional[tuple[np.ndarray, Mapping[int, int]]] = None) -> None:
    """Write one image's prediction. ``labels``: dataset labels (-1 = no class); ``panoptic``: segment ids and
    {segment id: dataset class index}."""
    from PIL import Image

    no_class = no_class_value(dataset)
    raw = np.full(labels.shape, no_class, dtype=np.int64)
    has = labels >= 0
    raw[has] = dataset.raw_label_values()[labels[has]]
    dtype = np.uint8 if no_class == NO_CLASS_8 else np.uint16
    _save_png(semantic_path(out_dir, sample_id), Image.fromarray(raw.astype(dtype)))
    if panoptic is not None:
        ids, classes = panoptic
        ids = ids.astype(np.int64)
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)
        png, js = panoptic_paths(out_dir, sample_id)
        _save_png(png, Image.fromarray(rgb, mode="RGB"))
        cats = dataset.category_ids()
        info = {"file_name": png.name, "segments_info": [
            {"id": int(sid), "category_id": int(cats[c]), "iscrowd": 0} for sid, c in sorted(classes.items())]}
        _atomic(js, json.dumps(info).encode())


def _save_png(path: Path, image) -> None:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    _atomic(path, buf.getvalue())


def _atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
