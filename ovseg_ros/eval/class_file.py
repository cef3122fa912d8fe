"""``--class-file``: ask a dataset's classes with a published class list, e.g. FC-CLIP's own.

FC-CLIP (Yu et al., NeurIPS 2023; github.com/bytedance/fc-clip) evaluates with the class lists of its
repository, ``fcclip/data/datasets/<dataset>_with_prompt_eng.txt`` (coco_panoptic, ade20k_150, cityscapes,
...), which come from OpenSeg (Ghiasi et al., ECCV 2022). Their names and synonyms differ from this
project's vocabularies, and FC-CLIP classifies with the maximum over a class's synonyms, so the logits and
the "seen" split differ too. Those files are the authors' data and are not shipped here: download the one
for your dataset and pass its path.

Format (read from the authors' loaders, ``openseg_classes.py``): one ``<id>:<name>,<synonym>,...`` per line;
``invalid_class_id`` marks an unused id. Lines are matched to the dataset's classes by the id its own
annotation files use (COCO panoptic category ids, ADE20K 1-150, Cityscapes train ids 0-18, VOC 1-20), so
the file's background or unused lines are simply not asked for. Thing/stuff flags stay the dataset's
(the COCO panoptic JSON's ``isthing``). Synonyms shared by two classes are kept, as the authors do.
"""

from __future__ import annotations

from pathlib import Path

from ..core.vocabulary import ClassSpec, Vocabulary, VocabularyError
from .datasets import Dataset, DatasetError

INVALID = "invalid_class_id"
MAX_BYTES = 4 * 1024 * 1024


def read_class_file(path: str | Path) -> dict[int, list[str]]:
    """{id: [name, synonyms...]} of a ``<id>:<names>`` file; :class:`DatasetError` naming the line when bad."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_BYTES:
            raise DatasetError(f"class file {p}: larger than {MAX_BYTES} bytes")
        text = p.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"class file {p}: cannot be read ({exc})") from None
    out: dict[int, list[str]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, names = line.partition(":")
        try:
            cid = int(key)
        except ValueError:
            cid = -1
        if not sep or cid < 0:
            raise DatasetError(f"class file {p}, line {n}: expected '<id>:<name>,<synonym>,...', got {line[:80]!r}")
        if cid in out:
            raise DatasetError(f"class file {p}, line {n}: id {cid} listed twice")
        if names.strip() == INVALID:
            continue
        parts = [s.strip() for s in names.split(",") if s.strip()]
        if not parts:
            raise DatasetError(f"class file {p}, line {n}: no name for id {cid}")
        out[cid] = parts
    return out


def class_file_vocabulary(path: str | Path, dataset: Dataset) -> Vocabulary:
    """The vocabulary ``dataset`` asks for, with the names and synonyms of the class file at ``path``."""
    entries = read_class_file(path)
    raw = dataset.raw_label_values()
    classes = []
    for vocab_id, label in enumerate(dataset.label_of_class):
        cid = int(raw[int(label)])
        if cid not in entries:
            raise DatasetError(f"class file {path} has no line for id {cid} "
                               f"({dataset.class_names[int(label)]!r} of {dataset.name})")
        names = entries[cid]
        classes.append(ClassSpec(names[0], tuple(names[1:]), "", bool(dataset.is_thing[int(label)]), True))
    try:
        return Vocabulary(tuple(classes), source=Path(path).stem, shared_texts=True)
    except VocabularyError as exc:
        raise DatasetError(f"class file {path}: {exc}") from None
