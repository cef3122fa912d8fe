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
from scipy import ndimage

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
    if labels.dtype in (np.int32, np.int16, np.uint16, np.int8):
        lo, hi, _, _ = cv2.minMaxLoc(labels)
    else:  # dtypes OpenCV does not reduce (int64, uint32, ...)
        lo, hi = int(labels.min()), int(labels.max())
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

    Cost: per present class one byte comparison; per thing class connected components inside the class's
    bounding box, aligned to even coordinates so OpenCV's 2x2-block labelling numbers components exactly as
    on the whole image. Stuff ids come from one table lookup; then areas and score sums are two histograms of
    the final ids and the boxes one ``ndimage.find_objects`` scan, whatever the number of segments.
    No ``ufunc.at``.
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
    # 8-connectivity: BBDT numbers components as the default (Spaghetti) does, and is the fastest.
    algorithm = cv2.CCL_BBDT if connectivity == 8 else cv2.CCL_DEFAULT
    ids_lut = np.zeros(256, dtype=np.int32)
    ids = np.zeros((h, w), dtype=np.int32)
    owners: list[tuple[int, bool]] = []  # (class, is_thing) per provisional id 1..n
    things: list[tuple[int, int, np.ndarray, np.ndarray, int]] = []  # (y, x, components, class mask, first id)
    for cls in present:
        mask = cv2.compare(codes, cls, cv2.CMP_EQ) if codes is not None else (labels == cls).view(np.uint8)
        if not vocabulary.classes[cls].is_thing:
            owners.append((cls, False))
            if codes is not None:
                ids_lut[cls] = len(owners)
            else:
                np.copyto(ids, len(owners), where=mask.view(bool))
            continue
        bx, by, bw, bh = cv2.boundingRect(mask)  # of the class's pixels
        ya, xa = by - by % 2, bx - bx % 2  # keep OpenCV's 2x2 block grid: the same numbering as uncropped
        crop = np.ascontiguousarray(mask[ya:by + bh, xa:bx + bw])
        n, comp = cv2.connectedComponentsWithAlgorithm(crop, connectivity, cv2.CV_32S, algorithm)
        things.append((ya, xa, comp, crop, len(owners)))
        owners.extend((cls, True) for _ in range(n - 1))
    if not owners:
        return PanopticResult(ids, [])
    if codes is not None:
        ids = cv2.LUT(codes, ids_lut)  # int32 table -> int32 ids; thing classes map to 0 here
    for ya, xa, comp, crop, first in things:
        # dtype given: OpenCV's binding reads a (4, 1) array as a Scalar and would refuse the mixed types.
        ids[ya:ya + comp.shape[0], xa:xa + comp.shape[1]] += cv2.add(comp, first, mask=crop, dtype=cv2.CV_32S)
    # Statistics of all segments at once: areas and score sums by histogram, boxes by one scan.
    n = len(owners)
    flat = ids.ravel()
    area = np.bincount(flat, minlength=n + 1)
    sums = np.bincount(flat, weights=conf.reshape(-1).astype(np.float64), minlength=n + 1)
    boxes = ndimage.find_objects(ids, max_label=n)
    keep = area[1:] >= max(min_area, 1)
    if not keep.all():  # renumber the kept ids 1..S in the same order, dropped ones to 0
        final = np.zeros(n + 1, dtype=np.int32)
        final[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        ids = final[ids]
    segments = []
    for k in np.flatnonzero(keep).tolist():
        ys, xs = boxes[k]
        cls, thing = owners[k]
        segments.append(Segment(len(segments) + 1, cls, thing, float(sums[k + 1] / area[k + 1] * scale),
                                int(area[k + 1]), (xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start)))
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
    """Blend ``color`` over the RGB ``image``; where ``labels`` is UNLABELED (255 in uint8 wire labels) the image
    shows through unchanged."""
    blend = cv2.addWeighted(image, 1.0 - alpha, color, alpha, 0.0)
    if labels is not None:
        if labels.dtype == np.uint8:  # wire-encoded labels: 255 is unlabeled
            keep = cv2.compare(labels, 255, cv2.CMP_EQ)
        else:
            keep = cv2.compare(labels if labels.dtype == np.int32 else labels.astype(np.int32), UNLABELED, cv2.CMP_EQ)
        cv2.copyTo(image, keep, blend)
    return blend
