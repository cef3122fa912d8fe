"""Core results -> ROS messages (ovseg_ros interfaces, vision_msgs/LabelInfo, label/confidence images).

Label conventions (vision_msgs, docs: ros-conventions.md section 3): ``mono8`` while the vocabulary has at
most 255 classes, 255 = unlabeled; ``mono16`` beyond, 65535 = unlabeled. The unlabeled id is never listed
in LabelInfo/Vocabulary, so consumers such as Nav2's semantic layer skip it.

Class ids on the wire are the vocabulary's stable ``ids`` (:mod:`ovseg_ros.core.class_ids`), not the positions
the segmenters label with: :func:`wire_labels` is the one place where positions become ids (a table look-up),
and every message below takes the ids from the vocabulary the frame was computed with.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import cv2
import numpy as np
from sensor_msgs.msg import RegionOfInterest

from ovseg_ros.msg import (
    PanopticSegment,
    PanopticSegmentation,
    SegmentationInfo,
    Vocabulary as VocabularyMsg,
    VocabularyClass,
)

from ..core.postprocess import class_codes
from ..core.vocabulary import Vocabulary
from .conversions import numpy_to_image

MONO8_MAX_CLASSES = 255


def label_encoding(num_classes: int) -> tuple[str, int]:
    """(encoding, unlabeled id) of the label image for a vocabulary of ``num_classes``."""
    return ("mono8", 255) if num_classes <= MONO8_MAX_CLASSES else ("mono16", 65535)


def nav2_vocabulary_error(num_classes: int, nav2_compatible: bool) -> Optional[str]:
    """Why a vocabulary of ``num_classes`` is refused in Nav2 mode (None when accepted).

    Nav2's semantic_segmentation_layer reads the mask as one byte per pixel and stores class ids as uint8:
    mono16 labels (more than 255 classes) would be read as garbage, so ``nav2_compatible`` keeps them mono8.
    """
    if nav2_compatible and num_classes > MONO8_MAX_CLASSES:
        return (f"nav2_compatible is on: {num_classes} classes would need mono16 labels, but Nav2's "
                f"semantic_segmentation_layer reads one byte per pixel (at most {MONO8_MAX_CLASSES} classes); "
                "use fewer classes or set nav2_compatible to false")
    return None


def encode_labels(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, str]:
    """(H, W) int32 core labels (-1 unlabeled) -> (uint8 or uint16 array, encoding).

    One narrowing cast: -1 wraps to 255 / 65535, the unlabeled ids. Labels already in the wire dtype
    (a segmenter that produced them so) are returned as they are.
    """
    encoding, _ = label_encoding(num_classes)
    dtype = np.uint8 if encoding == "mono8" else np.uint16
    if labels.dtype == dtype:
        return labels, encoding
    return labels.astype(dtype), encoding


def wire_labels(labels: np.ndarray, vocabulary: Vocabulary) -> tuple[np.ndarray, str, int]:
    """(H, W) core labels (positions, -1 unlabeled) -> (label image of the published ids, encoding, unlabeled id).

    The ids come from ``vocabulary`` (the one the frame was computed with), so a frame is never encoded with
    another revision's ids. Identity ids cost one cast; others one 256-entry LUT (mono8) or one gather (mono16).
    """
    encoding, unlabeled = label_encoding(vocabulary.id_bound)
    n = len(vocabulary)
    if vocabulary.ids_are_positions:
        return encode_labels(labels, n)[0], encoding, unlabeled
    ids = np.asarray(vocabulary.ids)
    codes = class_codes(labels, n) if encoding == "mono8" else None
    if codes is not None:  # positions as bytes (255 unlabeled) -> ids through a byte table
        table = np.full(256, 255, np.uint8)
        table[:n] = ids
        return cv2.LUT(codes, table), encoding, unlabeled
    lut = np.empty(n + 1, np.uint8 if encoding == "mono8" else np.uint16)
    lut[:n] = ids
    lut[n] = unlabeled  # position -1 indexes the last entry
    if labels.dtype in (np.int32, np.int16) and labels.ndim == 2 and labels.size:
        lo, hi, _, _ = cv2.minMaxLoc(labels)
        if lo >= -1 and hi < n:  # the core's contract: one gather
            return lut.take(labels), encoding, unlabeled
    pos = labels.astype(np.int64)  # anything else: unknown values become unlabeled
    if labels.dtype in (np.uint8, np.uint16):  # already in a wire dtype: its max value is "unlabeled"
        pos[labels == np.iinfo(labels.dtype).max] = -1
    pos[(pos < -1) | (pos >= n)] = -1
    return lut.take(pos), encoding, unlabeled


def encode_confidence(confidence: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1] -> mono8 0..255 (round half to even, saturated); uint8 passes through."""
    if confidence.dtype == np.uint8:
        return confidence
    if confidence.dtype not in (np.float32, np.float64) or confidence.ndim != 2:
        return np.clip(np.rint(confidence * 255.0), 0, 255).astype(np.uint8)
    # One pass: OpenCV rounds to nearest even and saturates to 0..255 while scaling.
    return cv2.multiply(confidence, 255.0, dtype=cv2.CV_8U)


def class_areas(labels: np.ndarray, num_classes: int) -> tuple[list[int], list[int]]:
    """(present class ids, pixel count of each), in one linear pass (no sort)."""
    codes = class_codes(labels, num_classes)
    if codes is not None:  # byte histogram (OpenCV's is exact while the image has < 2**24 pixels)
        if codes.size < 2**24:
            counts = cv2.calcHist([codes], [0], None, [256], [0, 256]).ravel().astype(np.int64)
        else:
            counts = np.bincount(codes.ravel(), minlength=256)
        counts = counts[:min(num_classes, 255)]
    else:
        counts = np.bincount(labels.ravel().astype(np.int64) + 1, minlength=num_classes + 1)[1:num_classes + 1]
    present = np.flatnonzero(counts)
    return present.tolist(), counts[present].tolist()


def vocabulary_msg(
    vocabulary: Vocabulary,
    stamp: Any,
    segmenter: str,
    model: str,
    prompts: Optional[Sequence[Sequence[str]]] = None,
) -> VocabularyMsg:
    encoding, unlabeled = label_encoding(vocabulary.id_bound)
    msg = VocabularyMsg()
    msg.header.stamp = stamp
    msg.revision = int(vocabulary.revision)
    msg.segmenter = segmenter
    msg.model = model
    msg.unlabeled_id = unlabeled
    msg.label_encoding = encoding
    classes = []
    for i, (c, class_id) in enumerate(zip(vocabulary.classes, vocabulary.ids)):
        item = VocabularyClass()
        item.id = class_id
        item.name = c.name
        item.synonyms = list(c.synonyms)
        item.prompts = list(prompts[i]) if prompts is not None and i < len(prompts) else list(c.names)
        item.description = c.description
        item.is_thing = bool(c.is_thing)
        classes.append(item)
    msg.classes = classes
    return msg


def label_info_type() -> Optional[type]:
    """vision_msgs/LabelInfo when vision_msgs is installed, else None (the output is then skipped)."""
    try:
        from vision_msgs.msg import LabelInfo  # type: ignore[import-not-found]
    except ImportError:
        return None
    return LabelInfo


def label_info_msg(label_info_cls: type, vocabulary: Vocabulary, stamp: Any, threshold: float = 0.0) -> Any:
    """LabelInfo with one VisionClass per live class id (exactly those); the unlabeled id is absent."""
    from vision_msgs.msg import VisionClass  # type: ignore[import-not-found]

    msg = label_info_cls()
    msg.header.stamp = stamp
    msg.class_map = [VisionClass(class_id=i, class_name=c.name)
                     for i, c in zip(vocabulary.ids, vocabulary.classes)]
    msg.threshold = float(threshold)
    return msg


#: Forms of ``~/panoptic`` (parameter ``panoptic_format``); the id image's ``encoding`` says which one a
#: message has: ``32SC1``; ``16UC1`` (half the bytes; a frame whose ids do not fit 16 bits is sent as
#: ``32SC1``); or an empty 0x0 image with encoding "" (segments only: class, score, area and box per segment).
PANOPTIC_FORMATS = ("int32", "uint16", "segments_only")


def panoptic_msg(header: Any, vocabulary: Vocabulary, panoptic: Any,
                 track_ids: Optional[Sequence[int]] = None, form: str = "int32") -> PanopticSegmentation:
    """A core PanopticResult -> PanopticSegmentation (id image in ``form``, see PANOPTIC_FORMATS, + segment
    list); ``track_ids``: one per segment (0 = untracked), or None (all 0)."""
    if form not in PANOPTIC_FORMATS:
        raise ValueError(f"panoptic_format must be one of {', '.join(PANOPTIC_FORMATS)}, got {form!r}")
    msg = PanopticSegmentation()
    msg.header = header
    msg.vocabulary_revision = int(vocabulary.revision)
    ids = panoptic.segment_ids
    if form == "segments_only":
        msg.segment_ids.header = header  # 0 x 0, encoding "": no id image
    elif form == "uint16" and (ids.size == 0 or 0 <= int(ids.min()) <= int(ids.max()) <= 0xFFFF):
        msg.segment_ids = numpy_to_image(ids.astype(np.uint16, copy=False), "16UC1", header)
    else:
        msg.segment_ids = numpy_to_image(ids.astype(np.int32, copy=False), "32SC1", header)
    segments = []
    for k, s in enumerate(panoptic.segments):
        seg = PanopticSegment()
        seg.id = int(s.id)
        known = 0 <= s.class_id < len(vocabulary)  # core segments carry positions; the message the id
        seg.class_id = int(vocabulary.ids[s.class_id]) if known else int(s.class_id)
        seg.class_name = vocabulary.classes[s.class_id].name if known else ""
        seg.is_thing = bool(s.is_thing)
        seg.score = float(s.score)
        seg.area = int(s.area)
        x, y, w, h = (int(v) for v in s.bbox)
        seg.bbox = RegionOfInterest(x_offset=x, y_offset=y, width=w, height=h, do_rectify=False)
        seg.track_id = int(track_ids[k]) if track_ids is not None else 0
        segments.append(seg)
    msg.segments = segments
    return msg


def info_msg(
    header: Any,
    vocabulary: Vocabulary,
    segmenter: str,
    latency_ms: float,
    inference_ms: float,
    dropped: int,
    labels: np.ndarray,
) -> SegmentationInfo:
    """``labels``: the published label image (:func:`wire_labels`), so ``class_ids`` are published ids."""
    msg = SegmentationInfo()
    msg.header = header
    msg.vocabulary_revision = int(vocabulary.revision)
    msg.segmenter = segmenter
    msg.latency_ms = float(latency_ms)
    msg.inference_ms = float(inference_ms)
    msg.dropped_frames = int(min(dropped, 2**32 - 1))
    ids, areas = class_areas(labels, vocabulary.id_bound)
    msg.class_ids = ids
    msg.class_areas = areas
    return msg
