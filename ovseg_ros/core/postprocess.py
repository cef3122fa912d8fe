"""Post-processing shared by all segmenters and the ROS layer: pure functions on numpy label maps.

* :func:`close_labels` - grey-scale closing of a label map (ITACLIP's final step).
* :func:`panoptic_from_semantic` - a panoptic result for segmenters without instances: each thing class
  split into connected components, stuff merged per class.
* :func:`make_palette`, :func:`colorize`, :func:`overlay` - visualisation for ``~/semantic/color`` and
  ``~/overlay``.
"""

from __future__ import annotations

import colorsys
from typing import Optional

import cv2
import numpy as np

from .segmenter import PanopticResult, Segment
from .vocabulary import UNLABELED, Vocabulary


def close_labels(labels: np.ndarray, kernel: int = 3) -> np.ndarray:
    """Morphological closing (max then min filter) of label ids with a ``kernel`` x ``kernel`` square.

    Works on ids, as the ITACLIP authors do (it fills one-pixel holes with the larger neighbouring id).
    UNLABELED is kept as the lowest value, so closing never invents it.
    """
    if kernel <= 1:
        return labels
    shifted = (labels.astype(np.int64) + 1).astype(np.uint16)  # -1..65533 -> 0..65534
    element = cv2.getStructuringElement(cv2.MORPH_RECT, (kernel, kernel))
    closed = cv2.morphologyEx(shifted, cv2.MORPH_CLOSE, element, borderType=cv2.BORDER_REPLICATE)
    return closed.astype(np.int32) - 1


def class_codes(labels: np.ndarray, num_classes: int) -> Optional[np.ndarray]:
    """(H, W) uint8 class codes (class id; 255 = unlabeled or an id the vocabulary lacks), or None.

    None when the ids do not fit a byte (vocabularies above 255 classes, ids outside -1..255): callers then
    take their general path. The byte codes are what the fast paths below run on (OpenCV's table lookups,
    comparisons and histograms work on 8-bit images); for at most 255 classes they are also exactly the
    ``mono8`` label image (unlabeled wraps to 255).
    """
    if labels.dtype == np.uint8:
        return labels if num_classes <= 255 else None
    if num_classes > 255 or labels.ndim != 2 or labels.size == 0:
        return None
    lo, hi, _, _ = cv2.minMaxLoc(labels if labels.dtype != np.int64 else labels.astype(np.int32))
    if lo < UNLABELED or hi > 255:
        return None
    return labels.astype(np.uint8)  # -1 wraps to 255


def panoptic_from_semantic(
    labels: np.ndarray,
    confidence: np.ndarray,
    vocabulary: Vocabulary,
    min_area: int = 0,
    connectivity: int = 8,
) -> PanopticResult:
    """Derive panoptic segments from a semantic label map.

    Stuff classes become one segment each; thing classes one segment per connected component
    (``connectivity`` 4 or 8). Components smaller than ``min_area`` pixels are dropped (left at id 0).
    Segment ids are 1..S in order of class id then component scan order (OpenCV's labelling order);
    score = mean confidence (``confidence`` float in [0, 1], or uint8 0..255 as on the wire).

    Cost: per present class one byte comparison and its bounding box (``cv2.boundingRect``), then
    connected components with statistics (area, box) only inside that box, aligned to even coordinates so
    OpenCV's 2x2-block labelling numbers components exactly as on the whole image; stuff ids are written by
    one table lookup; scores are masked means in each segment's box (or, beyond 64 thing segments, one
    weighted histogram of all ids). No ``ufunc.at``.
    """
    if labels.ndim != 2 or confidence.shape[:2] != labels.shape:
        raise ValueError(f"labels {labels.shape} and confidence {confidence.shape} must be (H, W) of one size")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    h, w = labels.shape
    n_cls = len(vocabulary)
    codes = class_codes(labels, n_cls)
    if codes is not None:
        if codes.size < 2**24:  # OpenCV's float histogram is exact below 2**24 counts
            counts = cv2.calcHist([codes], [0], None, [256], [0, 256]).ravel().astype(np.int64)
        else:
            counts = np.bincount(codes.ravel(), minlength=256)
        present = [int(c) for c in np.flatnonzero(counts[:255]) if c < n_cls]
    else:
        present = [int(c) for c in np.unique(labels) if 0 <= c < n_cls]
    conf = confidence if confidence.dtype in (np.uint8, np.float32, np.float64) else confidence.astype(np.float32)
    scale = 1.0 / 255.0 if conf.dtype == np.uint8 else 1.0
    # 8-connectivity: BBDT numbers components as the default (Spaghetti) does, with much cheaper statistics.
    algorithm = cv2.CCL_BBDT if connectivity == 8 else cv2.CCL_DEFAULT
    keep_area = max(min_area, 1)
    ids = np.zeros((h, w), dtype=np.int32)
    ids_lut = np.zeros(256, dtype=np.int32)
    meta: list[tuple[int, bool, np.ndarray, float]] = []  # (class, thing, stats row, score) per final id
    # Per thing class: (y, x, component map and class mask of its box, remap to final ids, kept labels, first).
    things: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]] = []
    next_id = 1
    for cls in present:
        mask = cv2.compare(codes, cls, cv2.CMP_EQ) if codes is not None else (labels == cls).view(np.uint8)
        bx, by, bw, bh = cv2.boundingRect(mask)  # of the non-zero pixels
        if not vocabulary.classes[cls].is_thing:
            box = (slice(by, by + bh), slice(bx, bx + bw))
            area = int(counts[cls]) if codes is not None else int(cv2.countNonZero(mask))
            if area < keep_area:
                continue
            score = cv2.mean(conf[box], mask=mask[box])[0] * scale
            if codes is not None:
                ids_lut[cls] = next_id
            else:
                np.copyto(ids[box], next_id, where=mask[box].view(bool))
            meta.append((cls, False, np.array([bx, by, bw, bh, area], np.int64), score))
            next_id += 1
            continue
        ya, xa = by - by % 2, bx - bx % 2  # keep OpenCV's 2x2 block grid: the same numbering as uncropped
        crop = np.ascontiguousarray(mask[ya:by + bh, xa:bx + bw])
        _, comp, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(crop, connectivity, cv2.CV_32S, algorithm)
        stats = stats[1:].astype(np.int64)
        kept = np.flatnonzero(stats[:, 4] >= keep_area)
        if not len(kept):
            continue
        remap = np.zeros(len(stats) + 1, dtype=np.int32)
        remap[kept + 1] = np.arange(next_id, next_id + len(kept), dtype=np.int32)
        things.append((ya, xa, comp, crop, remap, kept + 1, len(meta)))
        for row in stats[kept]:  # boxes in image coordinates
            meta.append((cls, True, row + np.array([xa, ya, 0, 0, 0]), 0.0))
        next_id += len(kept)
    if not meta:
        return PanopticResult(ids, [])
    if codes is not None and ids_lut.any():
        ids = cv2.LUT(codes, ids_lut)  # int32 table -> int32 ids; thing classes map to 0 here
    # Few thing segments: a masked mean in each one's own box; many: one weighted histogram of all ids.
    few = next_id - 1 - sum(1 for m in meta if not m[1]) <= 64
    for ya, xa, comp, crop, remap, local, first in things:
        box = (slice(ya, ya + comp.shape[0]), slice(xa, xa + comp.shape[1]))
        if len(local) == len(remap) - 1:  # nothing dropped: a shift of the component labels
            values = cv2.add(comp, int(remap[1]) - 1, mask=crop)
        else:
            values = remap[comp]
        ids[box] += values  # zero there so far: thing classes are 0 in the stuff table
        if few:
            for i, k in enumerate(local.tolist(), start=first):
                cls, thing, row, _ = meta[i]
                x, y, bw, bh = int(row[0]) - xa, int(row[1]) - ya, int(row[2]), int(row[3])
                own = (comp[y:y + bh, x:x + bw] == k).view(np.uint8)
                score = cv2.mean(conf[int(row[1]):int(row[1]) + bh, int(row[0]):int(row[0]) + bw], mask=own)[0]
                meta[i] = (cls, thing, row, score * scale)
    if not few:
        sums = np.bincount(ids.ravel(), weights=conf.astype(np.float64).ravel(), minlength=next_id)
        meta = [(c, t, r, float(sums[k] / r[4] * scale) if t else sc) for k, (c, t, r, sc) in enumerate(meta, start=1)]
    segments = [
        Segment(k, cls, thing, float(score), int(row[4]), (int(row[0]), int(row[1]), int(row[2]), int(row[3])))
        for k, (cls, thing, row, score) in enumerate(meta, start=1)
    ]
    return PanopticResult(ids, segments)


def make_palette(n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) uint8 distinct colours, stable for a given n (golden-ratio hues, alternating brightness)."""
    golden = 0.618033988749895
    out = np.empty((n, 3), dtype=np.uint8)
    for i in range(n):
        hue = (seed * 0.1 + i * golden) % 1.0
        sat = 0.65 + 0.35 * ((i // 7) % 2)
        val = 0.95 - 0.3 * ((i // 3) % 2)
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        out[i] = (int(r * 255), int(g * 255), int(b * 255))
    return out


def colorize(labels: np.ndarray, palette: np.ndarray, unlabeled_color: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """(H, W) int labels -> (H, W, 3) uint8 RGB; UNLABELED (and ids beyond the palette) get ``unlabeled_color``."""
    codes = class_codes(labels, len(palette))
    if codes is None:  # more than 255 classes: the general gather
        lut = np.vstack([np.asarray(unlabeled_color, np.uint8)[None], palette.astype(np.uint8)])
        idx = labels.astype(np.int64) + 1
        idx[(idx < 0) | (idx >= len(lut))] = 0
        return lut[idx]
    # One 4-byte gather per pixel (a pixel's RGB packed in a uint32), then drop the padding byte.
    table = np.zeros((256, 4), dtype=np.uint8)
    table[:] = (*unlabeled_color, 0)
    n = min(len(palette), 255)
    table[:n, :3] = palette[:n].astype(np.uint8)
    packed = table.view(np.uint32).ravel()[codes]
    return cv2.cvtColor(packed.view(np.uint8).reshape(*codes.shape, 4), cv2.COLOR_RGBA2RGB)


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = 0.5, labels: np.ndarray | None = None) -> np.ndarray:
    """Blend ``color`` over the RGB ``image``; where ``labels`` is UNLABELED the image shows through unchanged."""
    blend = cv2.addWeighted(image, 1.0 - alpha, color, alpha, 0.0)
    if labels is not None:
        if labels.dtype == np.uint8:
            raise ValueError("overlay needs int labels (-1 = unlabeled), not encoded uint8 ones")
        keep = cv2.compare(labels if labels.dtype == np.int32 else labels.astype(np.int32), UNLABELED, cv2.CMP_EQ)
        cv2.copyTo(image, keep, blend)
    return blend
