"""Helpers of the ovseg_ros.eval tests: tiny datasets written in each standard layout, and an oracle segmenter.

Every image of a dataset has its own size, so the oracle recognises an image by its shape (JPEG changes
pixels, never sizes) and returns the prediction the test chose for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ovseg_ros.core.segmenter import PanopticResult, Segment, SegmentationResult, Segmenter, VocabularyState
from ovseg_ros.core.vocabulary import Vocabulary


class OracleSegmenter(Segmenter):
    """Returns, for an image of shape (h, w), the labels (vocabulary ids) and segments set for that shape."""

    name = "oracle"

    def __init__(self, predictions: dict[tuple[int, int], np.ndarray],
                 panoptic: Optional[dict[tuple[int, int], tuple[np.ndarray, dict[int, int]]]] = None,
                 stop_after: int = 0) -> None:
        super().__init__(None)
        self.predictions = predictions
        self.panoptic = panoptic or {}
        self.calls = 0
        self.stop_after = stop_after  # raise KeyboardInterrupt on that call (an interrupted run)

    def encode_vocabulary(self, vocabulary: Vocabulary) -> VocabularyState:
        return VocabularyState(vocabulary)

    def segment(self, image: np.ndarray, state: Optional[VocabularyState] = None) -> SegmentationResult:
        self.calls += 1
        if self.stop_after and self.calls == self.stop_after:
            raise KeyboardInterrupt
        state = self._resolve_state(state)
        key = image.shape[:2]
        labels = self.predictions[key].astype(np.int32)
        pan = None
        if key in self.panoptic:
            ids, classes = self.panoptic[key]
            pan = PanopticResult(ids.astype(np.int32), [
                Segment(sid, cls, True, 1.0, int((ids == sid).sum()), (0, 0, 1, 1)) for sid, cls in classes.items()])
        return SegmentationResult(labels, np.ones(labels.shape, np.float32), state.vocabulary, pan)


def sizes(n: int) -> list[tuple[int, int]]:
    return [(6 + i, 9 + 2 * i) for i in range(n)]


def random_labels(shape: tuple[int, int], values: list[int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(values, size=shape).astype(np.int64)


def write_image(path: Path, shape: tuple[int, int], seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def write_label(path: Path, labels: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if labels.max() > 255:
        Image.fromarray(labels.astype(np.uint16)).save(path)
        return
    im = Image.fromarray(labels.astype(np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)])
    im.save(path)


def write_semantic(layout: str, root: Path, label_values: list[int], n: int = 3) -> dict[tuple[int, int], np.ndarray]:
    """Write ``n`` images with random raw labels drawn from ``label_values`` in ``layout``; returns raw labels by shape."""
    raw: dict[tuple[int, int], np.ndarray] = {}
    stems = [f"img{i:02d}" for i in range(n)]
    for i, (stem, shape) in enumerate(zip(stems, sizes(n))):
        labels = random_labels(shape, label_values, seed=i)
        raw[shape] = labels
        if layout == "voc":
            write_image(root / "JPEGImages" / f"{stem}.jpg", shape, i)
            write_label(root / "SegmentationClass" / f"{stem}.png", labels, palette=True)
        elif layout == "context":
            write_image(root / "JPEGImages" / f"{stem}.jpg", shape, i)
            write_label(root / "SegmentationClassContext" / f"{stem}.png", labels)
        elif layout in ("coco_object", "coco_stuff"):
            suffix = "_instanceTrainIds.png" if layout == "coco_object" else "_labelTrainIds.png"
            write_image(root / "images" / "val2017" / f"{stem}.jpg", shape, i)
            write_label(root / "annotations" / "val2017" / f"{stem}{suffix}", labels)
        elif layout == "cityscapes":
            city = "aachen" if i % 2 == 0 else "bonn"
            write_image(root / "leftImg8bit" / "val" / city / f"{city}_{stem}_leftImg8bit.png", shape, i)
            write_label(root / "gtFine" / "val" / city / f"{city}_{stem}_gtFine_labelTrainIds.png", labels)
        elif layout == "ade20k":
            write_image(root / "images" / "validation" / f"{stem}.jpg", shape, i)
            write_label(root / "annotations" / "validation" / f"{stem}.png", labels)
        elif layout == "folder":
            write_image(root / "images" / f"{stem}.png", shape, i)
            write_label(root / "labels" / f"{stem}.png", labels)
        else:
            raise ValueError(layout)
    if layout == "voc":
        (root / "ImageSets" / "Segmentation").mkdir(parents=True)
        (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(stems) + "\n")
    if layout == "context":
        (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
        (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("\n".join(stems) + "\n")
    return raw


def write_folder_classes(root: Path, names: list[str], **extra) -> None:
    root.mkdir(parents=True, exist_ok=True)
    import yaml

    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": names, **extra}))


def write_coco_panoptic(root: Path) -> dict:
    """Two images in COCO panoptic format; categories person (1, thing), car (3, thing), sky (119, stuff).

    Image A (6x9): two persons, the sky, a crowd of cars, void. Image B (7x11): one car and the sky.
    Returns {shape: (segment id map, {segment id: contiguous class})} of the ground truth.
    """
    cats = [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1},
            {"id": 119, "name": "sky-other-merged", "isthing": 0}]
    contiguous = {1: 0, 3: 1, 119: 2}
    images, annotations, truth = [], [], {}
    a = np.zeros((6, 9), np.int64)
    a[0:2, :] = 7  # sky
    a[2:6, 0:3] = 21  # person
    a[2:6, 4:6] = 22  # person
    a[4:6, 7:9] = 30  # crowd of cars
    segs_a = [(7, 119, 0), (21, 1, 0), (22, 1, 0), (30, 3, 1)]
    b = np.zeros((7, 11), np.int64)
    b[0:3, :] = 5  # sky
    b[3:7, 2:8] = 6  # car
    segs_b = [(5, 119, 0), (6, 3, 0)]
    for k, (stem, ids, segs) in enumerate((("000000000139", a, segs_a), ("000000000285", b, segs_b))):
        write_image(root / "val2017" / f"{stem}.jpg", ids.shape, k)
        rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
        (root / "panoptic_val2017").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / "panoptic_val2017" / f"{stem}.png")
        images.append({"id": k + 1, "file_name": f"{stem}.jpg", "height": ids.shape[0], "width": ids.shape[1]})
        annotations.append({"image_id": k + 1, "file_name": f"{stem}.png", "segments_info": [
            {"id": sid, "category_id": cid, "iscrowd": crowd, "area": int((ids == sid).sum())} for sid, cid, crowd in segs]})
        truth[ids.shape] = (ids, {sid: contiguous[cid] for sid, cid, _ in segs})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "panoptic_val2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return truth
