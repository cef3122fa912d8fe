"""Evaluation datasets in their standard on-disk layouts, each read by a small class with one interface.

Every reader lists its samples (image + annotation file, sorted by id so all ranks agree on the order),
names its classes in label order, gives the :class:`Vocabulary` the segmenter is asked for (the same
dataset vocabularies the presets use: ``ovseg_ros/core/data/datasets/*.yaml`` and
``config/vocabularies/*.yaml``) and says how a predicted vocabulary id maps to a dataset label.

Layouts (the ones the ITACLIP, CaR and FC-CLIP evaluations read, via mmsegmentation / detectron2):

=================  ==========================================================================================
``voc``            VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/val.txt};
                   21 labels (0 background), 255 ignore
``context60``      VOC2010/{JPEGImages, SegmentationClassContext/*.png, ImageSets/SegmentationContext/val.txt};
                   60 labels (0 background)
``context59``      same files; label 0 is ignored and the rest shift down by one (59 classes)
``coco_object``    {images/val2017/*.jpg, annotations/val2017/*_instanceTrainIds.png}; 81 labels (0 background)
``coco_stuff``     {images/val2017/*.jpg, annotations/val2017/*_labelTrainIds.png}; 171 labels, 255 ignore
``cityscapes``     {leftImg8bit/val/<city>/*_leftImg8bit.png, gtFine/val/<city>/*_gtFine_labelTrainIds.png}; 19
``ade20k``         ADEChallengeData2016/{images/validation/*.jpg, annotations/validation/*.png}; 0 ignored, 150
``coco_panoptic``  {val2017/*.jpg, panoptic_val2017/*.png, annotations/panoptic_val2017.json} (COCO panoptic)
``folder``         {images/*, labels/<same stem>.png, classes.yaml}; see :class:`FolderDataset`
=================  ==========================================================================================

Where the dataset has a background label that is not a class of the vocabulary (VOC, Context-60,
COCO-Object), pixels the segmenter leaves unlabeled count as background; elsewhere they count as
"no class" (a miss). A missing or malformed dataset raises :class:`DatasetError` naming the expected layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.vocabulary import (
    ClassSpec,
    Vocabulary,
    VocabularyError,
    find_vocabulary_preset,
    load_vocabulary_file,
)
from .panoptic import SegmentInfo

DATASET_VOCAB_DIR = Path(__file__).resolve().parents[1] / "core" / "data" / "datasets"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IGNORE = 255


class DatasetError(ValueError):
    """A dataset that cannot be read; the message names the file and the expected layout."""


@dataclass(frozen=True)
class Sample:
    """One evaluation item: ``id`` is unique in the dataset (per-image results are keyed by it)."""

    id: str
    image: Path
    annotation: Path


@dataclass
class PanopticTarget:
    """Ground truth of a panoptic image: segment ids (0 = void), their classes, and the semantic map."""

    segment_ids: np.ndarray
    segments: dict[int, SegmentInfo]
    semantic: np.ndarray


@dataclass
class Dataset:
    """The one interface of every reader (subclasses only fill the fields in ``__init__``)."""

    name: str
    root: Path
    samples: list[Sample]
    class_names: list[str]
    is_thing: list[bool]
    vocabulary: Vocabulary
    #: Dataset label of each vocabulary id (index = vocabulary id).
    label_of_class: np.ndarray
    #: Dataset label of an unlabeled prediction; -1 = no class (counted as a miss).
    unlabeled_label: int = -1
    ignore_index: int = IGNORE
    kind: str = "semantic"  # or "panoptic"
    layout: str = ""
    #: Reader-specific data (the COCO panoptic reader keeps the segments of every image here).
    _extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load_image(self, i: int) -> np.ndarray:
        return read_rgb(self.samples[i].image, self.layout)

    def load_target(self, i: int) -> np.ndarray | PanopticTarget:
        """(H, W) int64 dataset labels with :attr:`ignore_index` (semantic) or a :class:`PanopticTarget`."""
        return self._map_labels(read_label_png(self.samples[i].annotation, self.layout))

    def _map_labels(self, raw: np.ndarray) -> np.ndarray:
        return raw.astype(np.int64)

    def raw_label_values(self) -> np.ndarray:
        """The value of each dataset label (class index) in the dataset's own annotation files."""
        return np.arange(self.num_classes, dtype=np.int64)

    def category_ids(self) -> np.ndarray:
        """The id of each class in the dataset's own category list (panoptic ``category_id``)."""
        return self.raw_label_values()

    def predicted_labels(self, labels: np.ndarray) -> np.ndarray:
        """Segmenter labels (vocabulary ids, -1 = unlabeled) -> dataset labels (-1 = no class)."""
        table = np.append(self.label_of_class, self.unlabeled_label).astype(np.int64)
        idx = np.where((labels >= 0) & (labels < len(self.label_of_class)), labels, len(self.label_of_class))
        return table[idx]


# --- file helpers ------------------------------------------------------------------------------------
def read_rgb(path: Path, layout: str = "") -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"{path}: not a readable image ({exc}){_layout_hint(layout)}") from None


def read_label_png(path: Path, layout: str = "") -> np.ndarray:
    """A single-channel label PNG as stored (palette indices for paletted VOC PNGs, 8 or 16 bit)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise DatasetError(f"{path}: a label map must be a single-channel PNG (8/16-bit or paletted), "
                                   f"got mode {im.mode}{_layout_hint(layout)}")
            return np.array(im).astype(np.int64)
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"{path}: not a readable label PNG ({exc}){_layout_hint(layout)}") from None


def _layout_hint(layout: str) -> str:
    return f"\nexpected layout: {layout}" if layout else ""


def _need_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"missing folder {path}{_layout_hint(layout)}")
    return path


def _need_file(path: Path, layout: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"missing file {path}{_layout_hint(layout)}")
    return path


def _pairs_from_split(image_dir: Path, ann_dir: Path, split: Path, layout: str,
                      img_suffix: str = ".jpg", ann_suffix: str = ".png") -> list[Sample]:
    ids = [ln.split()[0] for ln in split.read_text().splitlines() if ln.strip()]
    if not ids:
        raise DatasetError(f"{split} lists no images{_layout_hint(layout)}")
    samples = [Sample(s, image_dir / f"{s}{img_suffix}", ann_dir / f"{s}{ann_suffix}") for s in ids]
    _check_exist(samples, layout)
    return samples


def _pairs_from_glob(image_dir: Path, ann_dir: Path, layout: str, img_suffix: str, ann_suffix: str,
                     recursive: bool = False) -> list[Sample]:
    pattern = f"**/*{img_suffix}" if recursive else f"*{img_suffix}"
    samples = []
    for img in sorted(image_dir.glob(pattern)):
        rel = img.relative_to(image_dir)
        stem = str(rel)[: -len(img_suffix)]
        samples.append(Sample(stem, img, ann_dir / f"{stem}{ann_suffix}"))
    if not samples:
        raise DatasetError(f"no *{img_suffix} images in {image_dir}{_layout_hint(layout)}")
    _check_exist(samples, layout)
    return samples


def _check_exist(samples: Sequence[Sample], layout: str) -> None:
    for s in samples:
        for what, p in (("image", s.image), ("annotation", s.annotation)):
            if not p.is_file():
                raise DatasetError(f"{what} of {s.id!r} is missing: {p}{_layout_hint(layout)}")


def dataset_vocabulary(name: str) -> Vocabulary:
    """A class list of ``core/data/datasets`` or, failing that, a vocabulary preset (``config/vocabularies``)."""
    path = DATASET_VOCAB_DIR / f"{name}.yaml"
    if not path.is_file():
        found = find_vocabulary_preset(name)
        if found is None:
            raise DatasetError(f"no class list {name!r} in {DATASET_VOCAB_DIR} or the vocabulary presets")
        path = found
    return load_vocabulary_file(path)


def dataset_class_names(vocab: Vocabulary) -> list[str]:
    """The dataset's own names of the classes of ``vocab`` (a class list of ``core/data/datasets``).

    The query names are chosen for CLIP (VOC's 'boat' is asked as 'ship'); reports name the classes as
    the dataset does, from the file's optional ``dataset_names:`` list (same order), else the query names.
    """
    import yaml

    path = DATASET_VOCAB_DIR / f"{vocab.source}.yaml"
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        data = None
    names = data.get("dataset_names") if isinstance(data, dict) else None
    if isinstance(names, list) and len(names) == len(vocab) and all(isinstance(n, str) for n in names):
        return list(names)
    return list(vocab.names)


def _with_background(vocab: Vocabulary) -> tuple[list[str], list[bool], np.ndarray]:
    """Dataset classes 'background' + vocabulary; vocabulary id i is dataset label i + 1."""
    return (["background"] + dataset_class_names(vocab), [False] + [c.is_thing for c in vocab.classes],
            np.arange(1, len(vocab) + 1))


# --- readers ----------------------------------------------------------------------------------------
def voc(root: str | Path) -> Dataset:
    root = Path(root)
    layout = ("VOC2012/ JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette indices 0-20, 255 ignore), "
              "ImageSets/Segmentation/val.txt; --root is the VOC2012 folder")
    split = _need_file(root / "ImageSets" / "Segmentation" / "val.txt", layout)
    samples = _pairs_from_split(_need_dir(root / "JPEGImages", layout),
                                _need_dir(root / "SegmentationClass", layout), split, layout)
    vocab = dataset_vocabulary("voc20")
    names, things, table = _with_background(vocab)
    return Dataset("voc", root, samples, names, things, vocab, table, unlabeled_label=0, layout=layout)


class _Context59(Dataset):
    def _map_labels(self, raw: np.ndarray) -> np.ndarray:
        # Label 0 (background / rare classes) is not scored; 1..59 become 0..58 (mmseg reduce_zero_label).
        out = raw - 1
        out[(raw == 0) | (raw == IGNORE)] = IGNORE
        return out

    def raw_label_values(self) -> np.ndarray:
        return np.arange(1, self.num_classes + 1, dtype=np.int64)


def _context(root: str | Path, n: int) -> Dataset:
    root = Path(root)
    layout = ("VOC2010/ JPEGImages/<id>.jpg, SegmentationClassContext/<id>.png (0 background, 1-59 classes), "
              "ImageSets/SegmentationContext/val.txt (the mmsegmentation conversion); --root is the VOC2010 folder")
    split = _need_file(root / "ImageSets" / "SegmentationContext" / "val.txt", layout)
    samples = _pairs_from_split(_need_dir(root / "JPEGImages", layout),
                                _need_dir(root / "SegmentationClassContext", layout), split, layout)
    vocab = dataset_vocabulary("context59")
    if n == 60:
        names, things, table = _with_background(vocab)
        return Dataset("context60", root, samples, names, things, vocab, table, unlabeled_label=0, layout=layout)
    return _Context59("context59", root, samples, dataset_class_names(vocab), [c.is_thing for c in vocab.classes], vocab,
                      np.arange(len(vocab)), layout=layout)


def context60(root: str | Path) -> Dataset:
    return _context(root, 60)


def context59(root: str | Path) -> Dataset:
    return _context(root, 59)


def coco_object(root: str | Path) -> Dataset:
    root = Path(root)
    layout = ("<root>/ images/val2017/<id>.jpg, annotations/val2017/<id>_instanceTrainIds.png "
              "(0 background, 1-80 the COCO things, 255 ignore; the SCLIP/ITACLIP conversion)")
    samples = _pairs_from_glob(_need_dir(root / "images" / "val2017", layout),
                               _need_dir(root / "annotations" / "val2017", layout), layout, ".jpg",
                               "_instanceTrainIds.png")
    vocab = dataset_vocabulary("coco_object")
    names, things, table = _with_background(vocab)
    return Dataset("coco_object", root, samples, names, things, vocab, table, unlabeled_label=0, layout=layout)


def _plain(name: str, vocab_name: str, root: Path, samples: list[Sample], layout: str,
           cls: type[Dataset] = Dataset) -> Dataset:
    vocab = dataset_vocabulary(vocab_name)
    return cls(name, root, samples, dataset_class_names(vocab), [c.is_thing for c in vocab.classes], vocab,
               np.arange(len(vocab)), layout=layout)


def coco_stuff(root: str | Path) -> Dataset:
    root = Path(root)
    layout = ("<root>/ images/val2017/<id>.jpg, annotations/val2017/<id>_labelTrainIds.png "
              "(0-170, 255 ignore; the mmsegmentation COCO-Stuff 164k conversion)")
    samples = _pairs_from_glob(_need_dir(root / "images" / "val2017", layout),
                               _need_dir(root / "annotations" / "val2017", layout), layout, ".jpg",
                               "_labelTrainIds.png")
    return _plain("coco_stuff", "coco_stuff", root, samples, layout)


def cityscapes(root: str | Path) -> Dataset:
    root = Path(root)
    layout = ("<root>/ leftImg8bit/val/<city>/<id>_leftImg8bit.png, gtFine/val/<city>/<id>_gtFine_labelTrainIds.png "
              "(0-18, 255 ignore; made by cityscapesscripts' createTrainIdLabelImgs)")
    samples = _pairs_from_glob(_need_dir(root / "leftImg8bit" / "val", layout),
                               _need_dir(root / "gtFine" / "val", layout), layout, "_leftImg8bit.png",
                               "_gtFine_labelTrainIds.png", recursive=True)
    return _plain("cityscapes", "cityscapes", root, samples, layout)


class _ReduceZero(Dataset):
    def _map_labels(self, raw: np.ndarray) -> np.ndarray:
        out = raw - 1
        out[raw == 0] = IGNORE
        return out

    def raw_label_values(self) -> np.ndarray:
        return np.arange(1, self.num_classes + 1, dtype=np.int64)


def ade20k(root: str | Path) -> Dataset:
    root = Path(root)
    layout = ("ADEChallengeData2016/ images/validation/<id>.jpg, annotations/validation/<id>.png "
              "(0 = other, not scored; 1-150 the classes); --root is the ADEChallengeData2016 folder")
    samples = _pairs_from_glob(_need_dir(root / "images" / "validation", layout),
                               _need_dir(root / "annotations" / "validation", layout), layout, ".jpg", ".png")
    return _plain("ade20k", "ade20k", root, samples, layout, _ReduceZero)


class _Panoptic(Dataset):
    def load_target(self, i: int) -> PanopticTarget:
        s = self.samples[i]
        rgb = read_rgb(s.annotation, self.layout).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
        segments = self._extra["segments"][s.id]
        semantic = np.full(ids.shape, IGNORE, dtype=np.int64)
        for sid, info in segments.items():
            semantic[ids == sid] = info.class_id
        return PanopticTarget(ids, segments, semantic)

    def raw_label_values(self) -> np.ndarray:
        return np.asarray(self._extra["category_ids"], dtype=np.int64)


def coco_panoptic(root: str | Path, split: str = "val2017") -> Dataset:
    """COCO panoptic (detectron2's layout). Class order = the JSON's categories, sorted by id; the standard
    133 categories are asked with ``config/vocabularies/coco_panoptic.yaml`` (same order, with synonyms),
    other category lists with their own names."""
    root = Path(root)
    layout = (f"<root>/ {split}/<file_name>.jpg, panoptic_{split}/<file_name>.png (RGB-encoded segment ids), "
              f"annotations/panoptic_{split}.json (COCO panoptic format)")
    ann_path = _need_file(root / "annotations" / f"panoptic_{split}.json", layout)
    image_dir = _need_dir(root / split, layout)
    png_dir = _need_dir(root / f"panoptic_{split}", layout)
    try:
        data = json.loads(ann_path.read_text())
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        cat_index = {int(c["id"]): k for k, c in enumerate(cats)}
        names = [str(c["name"]) for c in cats]
        things = [bool(c.get("isthing", 1)) for c in cats]
        images = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        samples: list[Sample] = []
        segments: dict[str, dict[int, SegmentInfo]] = {}
        for ann in data["annotations"]:
            stem = Path(images[int(ann["image_id"])]).stem
            samples.append(Sample(stem, image_dir / images[int(ann["image_id"])], png_dir / ann["file_name"]))
            segments[stem] = {int(s["id"]): SegmentInfo(cat_index[int(s["category_id"])], bool(s.get("iscrowd", 0)))
                              for s in ann["segments_info"]}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{ann_path}: not a COCO panoptic annotation file ({type(exc).__name__}: {exc})"
                           f"{_layout_hint(layout)}") from None
    if not samples:
        raise DatasetError(f"{ann_path} has no annotations{_layout_hint(layout)}")
    samples.sort(key=lambda s: s.id)
    _check_exist(samples, layout)
    vocab = _panoptic_vocabulary(names, things)
    ds = _Panoptic("coco_panoptic", root, samples, names, things, vocab, np.arange(len(names)),
                   kind="panoptic", layout=layout)
    ds._extra["segments"] = segments
    ds._extra["category_ids"] = [int(c["id"]) for c in cats]
    ds._extra["identity_files"] = {"annotations": str(ann_path)}
    return ds


def _panoptic_vocabulary(names: list[str], things: list[bool]) -> Vocabulary:
    standard = find_vocabulary_preset("coco_panoptic")
    if standard is not None and len(names) == 133 and names[0] == "person":
        vocab = load_vocabulary_file(standard)
        return Vocabulary(tuple(ClassSpec(c.name, c.synonyms, c.description, t, True)
                                for c, t in zip(vocab.classes, things)), source="coco_panoptic")
    # COCO-style names such as 'wall-other-merged' read better to CLIP as 'wall'.
    clean = [re.sub(r"-(other-merged|merged|other|stuff)$", "", n).replace("-", " ") for n in names]
    try:
        return Vocabulary(tuple(ClassSpec(n, (), "", t, True) for n, t in zip(clean, things)), source="dataset")
    except VocabularyError as exc:
        raise DatasetError(f"the dataset's category names do not make a vocabulary: {exc}") from None


class FolderDataset(Dataset):
    """Your own data: ``images/<stem>.<jpg|png|...>``, ``labels/<stem>.png`` and ``classes.yaml``.

    ``classes.yaml`` is a vocabulary file (``classes:`` list, as ``config/vocabularies``): label value i is
    class i. Optional keys: ``ignore_index`` (default 255) and ``background`` (a class index that is not
    asked for; pixels the segmenter leaves unlabeled count as it).
    """


def folder(root: str | Path) -> Dataset:
    import yaml

    root = Path(root)
    layout = ("<root>/ images/<stem>.jpg|png, labels/<stem>.png (class index per pixel, 8 or 16 bit), "
              "classes.yaml (classes: [...]; optional ignore_index: 255, background: <class index>)")
    cfg_path = _need_file(root / "classes.yaml", layout)
    try:
        cfg = yaml.safe_load(cfg_path.read_text())
        all_classes = load_vocabulary_file(cfg_path)
    except (yaml.YAMLError, VocabularyError) as exc:
        raise DatasetError(f"{cfg_path}: {exc}{_layout_hint(layout)}") from None
    ignore = cfg.get("ignore_index", IGNORE)
    background = cfg.get("background")
    if not isinstance(ignore, int) or (background is not None and not (
            isinstance(background, int) and 0 <= background < len(all_classes))):
        raise DatasetError(f"{cfg_path}: ignore_index must be an integer and background a class index "
                           f"(0..{len(all_classes) - 1}){_layout_hint(layout)}")
    image_dir, label_dir = _need_dir(root / "images", layout), _need_dir(root / "labels", layout)
    samples = [Sample(p.stem, p, label_dir / f"{p.stem}.png") for p in sorted(image_dir.iterdir())
               if p.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise DatasetError(f"no images in {image_dir}{_layout_hint(layout)}")
    _check_exist(samples, layout)
    asked = [i for i in range(len(all_classes)) if i != background]
    if not asked:
        raise DatasetError(f"{cfg_path}: no class left to ask for besides the background")
    vocab = Vocabulary(tuple(all_classes.classes[i] for i in asked), source=root.name)
    return FolderDataset("folder", root, samples, all_classes.names, [c.is_thing for c in all_classes.classes],
                         vocab, np.asarray(asked), unlabeled_label=-1 if background is None else background,
                         ignore_index=ignore, layout=layout)


READERS = {
    "voc": voc, "context59": context59, "context60": context60, "coco_object": coco_object,
    "coco_stuff": coco_stuff, "cityscapes": cityscapes, "ade20k": ade20k, "coco_panoptic": coco_panoptic,
    "folder": folder,
}


def open_dataset(name: str, root: str | Path) -> Dataset:
    """Read dataset ``name`` (a key of :data:`READERS`) at ``root``; raises :class:`DatasetError`."""
    if name not in READERS:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(READERS)}")
    try:
        return READERS[name](root)
    except DatasetError as exc:
        if not Path(root).is_dir():
            raise DatasetError(f"dataset root {root} is not a folder; {exc}") from None
        raise
