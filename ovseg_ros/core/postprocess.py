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

from .runs import row_runs, same_value_components
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
    Segment ids are 1..S in order of class id, then of OpenCV's labelling order within a class (first 2x2
    block in raster order for 8-connectivity, first pixel for 4); score = mean confidence (``confidence``
    float in [0, 1], or uint8 0..255 as on the wire).

    Cost: one labelling of all classes together on row runs (:mod:`.runs`), whatever the number of classes
    or segments; the per-pixel work is finding the runs, one confidence sum per run and painting the ids.
    """
    if labels.ndim != 2 or confidence.shape[:2] != labels.shape:
        raise ValueError(f"labels {labels.shape} and confidence {confidence.shape} must be (H, W) of one size")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    h, w = labels.shape
    n_cls = len(vocabulary)
    if labels.size == 0:
        return PanopticResult(np.zeros((h, w), dtype=np.int32), [])
    codes = class_codes(labels, n_cls)  # byte codes make the neighbour comparison 4-8x cheaper
    runs = row_runs(codes if codes is not None else labels)
    value = runs.value.astype(np.int64)
    valid = (value >= 0) & (value < n_cls)
    is_thing = np.array([c.is_thing for c in vocabulary.classes] + [False], dtype=bool)
    thing = valid & is_thing[np.where(valid, value, n_cls)]
    members = np.flatnonzero(thing)
    component, key = same_value_components(runs, members, connectivity)
    # Segments: one per present stuff class (key -1 sorts it first; it is alone in its class) and one per
    # thing component, ordered by (class, key).
    stuff_classes = np.unique(value[valid & ~thing])
    comp_class = np.empty(key.size, dtype=np.int64)
    comp_class[component] = value[members]
    seg_class = np.concatenate([stuff_classes, comp_class])
    order = np.lexsort((np.concatenate([np.full(stuff_classes.size, -1), key]), seg_class))
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    seg_of_run = np.full(value.size, -1, dtype=np.int64)
    stuff_runs = np.flatnonzero(valid & ~thing)
    seg_of_run[stuff_runs] = rank[np.searchsorted(stuff_classes, value[stuff_runs])]
    seg_of_run[members] = rank[stuff_classes.size + component]
    if order.size == 0:
        return PanopticResult(np.zeros((h, w), dtype=np.int32), [])
    # Statistics from the runs: areas and confidence sums by histogram, boxes from the runs sorted by segment.
    labelled = np.flatnonzero(seg_of_run >= 0)
    seg = seg_of_run[labelled]
    length = runs.length[labelled]
    n = order.size
    area = np.bincount(seg, weights=length, minlength=n).astype(np.int64)
    conf = confidence if confidence.dtype in (np.uint8, np.float32, np.float64) else confidence.astype(np.float32)
    run_sums = np.add.reduceat(conf.reshape(-1), runs.start, dtype=np.float64)
    sums = np.bincount(seg, weights=run_sums[labelled], minlength=n)
    scale = 1.0 / 255.0 if conf.dtype == np.uint8 else 1.0
    by_seg = np.argsort(seg, kind="stable")  # raster order within a segment
    bounds = np.flatnonzero(np.r_[True, seg[by_seg][1:] != seg[by_seg][:-1]])
    row = runs.row[labelled][by_seg]
    x0 = (runs.start[labelled] % w)[by_seg]
    x1 = x0 + length[by_seg] - 1
    top = row[bounds]
    bottom = np.maximum.reduceat(row, bounds)
    left = np.minimum.reduceat(x0, bounds)
    right = np.maximum.reduceat(x1, bounds)
    keep = area >= max(min_area, 1)
    final = np.zeros(n + 1, dtype=np.int32)  # segment -> id, 0 for dropped; index n is "no segment"
    final[:n][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    ids = np.repeat(final[seg_of_run], runs.length).reshape(h, w)
    kept = np.flatnonzero(keep)
    cls = seg_class[order[kept]]
    columns = zip(final[kept].tolist(), cls.tolist(), is_thing[cls].tolist(), (sums[kept] / area[kept] * scale).tolist(),
                  area[kept].tolist(), left[kept].tolist(), top[kept].tolist(), (right - left + 1)[kept].tolist(),
                  (bottom - top + 1)[kept].tolist())
    segments = [Segment(i, c, t, s, a, (x, y, bw, bh)) for i, c, t, s, a, x, y, bw, bh in columns]
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
