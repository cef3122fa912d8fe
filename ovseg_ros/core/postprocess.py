"""Post-processing shared by all segmenters and the ROS layer: pure functions on numpy label maps.

* :func:`close_labels` - grey-scale closing of a label map (ITACLIP's final step).
* :func:`panoptic_from_semantic` - a panoptic result for segmenters without instances: each thing class
  split into connected components, stuff merged per class.
* :func:`make_palette`, :func:`colorize`, :func:`overlay` - visualisation for ``~/semantic/color`` and
  ``~/overlay``.
"""

from __future__ import annotations

import colorsys

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
    Segment ids are 1..S in order of class id then component scan order; score = mean confidence.

    Cost is a few passes over the image whatever the number of segments: one connected-components pass
    per thing class, then areas, boxes and scores for all segments at once with ``bincount``.
    """
    h, w = labels.shape
    flat_labels = labels.ravel()
    # Provisional ids: each thing component and each stuff class gets a running id; -1 = none.
    provisional = np.full(h * w, -1, dtype=np.int64)
    owners: list[tuple[int, bool]] = []  # (class id, is_thing) per provisional id
    present = np.unique(flat_labels)
    for cls in present[(present != UNLABELED) & (present < len(vocabulary))]:
        cls = int(cls)
        thing = vocabulary.classes[cls].is_thing
        in_class = flat_labels == cls
        if thing:
            n, comp = cv2.connectedComponents(in_class.reshape(h, w).astype(np.uint8), connectivity=connectivity)
            comp = comp.ravel()
            provisional[in_class] = comp[in_class] - 1 + len(owners)
            owners.extend((cls, True) for _ in range(n - 1))
        else:
            provisional[in_class] = len(owners)
            owners.append((cls, False))
    ids = np.zeros((h, w), dtype=np.int32)
    if not owners:
        return PanopticResult(ids, [])
    valid = provisional >= 0
    pid = provisional[valid]
    n = len(owners)
    area = np.bincount(pid, minlength=n)
    score_sum = np.bincount(pid, weights=confidence.ravel()[valid].astype(np.float64), minlength=n)
    ys, xs = np.divmod(np.flatnonzero(valid), w)
    x0 = np.full(n, w, np.int64)
    y0 = np.full(n, h, np.int64)
    x1 = np.full(n, -1, np.int64)
    y1 = np.full(n, -1, np.int64)
    np.minimum.at(x0, pid, xs)
    np.minimum.at(y0, pid, ys)
    np.maximum.at(x1, pid, xs)
    np.maximum.at(y1, pid, ys)
    # Final ids 1..S for the kept provisional ids, in provisional order.
    keep = area >= max(min_area, 1)
    final = np.zeros(n + 1, dtype=np.int32)  # index 0 <- provisional -1
    final[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    ids = final[provisional + 1].reshape(h, w)
    segments = [
        Segment(int(final[k + 1]), cls, thing, float(score_sum[k] / area[k]), int(area[k]),
                (int(x0[k]), int(y0[k]), int(x1[k] - x0[k] + 1), int(y1[k] - y0[k] + 1)))
        for k, (cls, thing) in enumerate(owners)
        if keep[k]
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
    lut = np.vstack([np.asarray(unlabeled_color, np.uint8)[None], palette.astype(np.uint8)])
    idx = labels.astype(np.int64) + 1
    idx[(idx < 0) | (idx >= len(lut))] = 0
    return lut[idx]


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = 0.5, labels: np.ndarray | None = None) -> np.ndarray:
    """Blend ``color`` over the RGB ``image``; where ``labels`` is UNLABELED the image shows through unchanged."""
    blend = cv2.addWeighted(image, 1.0 - alpha, color, alpha, 0.0)
    if labels is not None:
        keep = labels == UNLABELED
        blend[keep] = image[keep]
    return blend
