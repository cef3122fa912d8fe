"""Temporal stability of the semantic labels (node parameter ``temporal_filter``).

``none``: labels as segmented. ``vote``: at each pixel, a confidence-weighted vote over the labels of the last
``frames`` frames that restarts where the image changes -

* a frame's vote at a pixel counts only while the image at that pixel has not changed since that frame (largest
  absolute difference of the R, G, B values above ``image_threshold`` between consecutive frames, the change
  mask grown by ``dilate`` pixels so that the border of a moving object is covered);
* the published label is the one with the largest sum of confidences among the counted votes (ties: the newer).

So where the image changed, the label follows the segmenter at once: nothing is smeared behind a moving object
or a panning camera. Where it did not, a label seen in one frame out of three is outvoted (one-frame flips at
class borders, the most common flicker, and one-frame misses of an object never reach the output). The lag
before a true change of label is followed is therefore 0 frames where the image changed and, where it did not
(only when the segmenter changes its mind about an unchanged image), the frames until the new label holds
the larger share of the window: ``frames // 2`` at equal confidence.

Why this method: the segmenters publish the score of the chosen class only, so a filter on the class score margin
would need every class's score on the wire; a plain running vote smears as soon as anything moves, hence the
restart where the image changes (plain frame differencing). A per-pixel hysteresis (hold the label until a new
one persists N frames) was tried first and dropped: after a one-frame miss of a moving object it keeps the
miss's label inside the object for N - 1 frames (cut in two, a new track id); the vote restores it at once.
No method or code of a paper is reproduced here.

The published confidence is the newest confidence of the published label within the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Optional

import cv2
import numpy as np

FILTERS = ("none", "vote")
#: Largest voting window (frames kept per pixel).
MAX_FRAMES = 7


@dataclass(frozen=True)
class FilterConfig:
    method: str = "none"
    #: frames in the vote (1 = no filtering)
    frames: int = 3
    #: colour difference (0..255, largest over the channels) above which a pixel counts as changed
    image_threshold: int = 10
    #: radius (pixels) by which the change mask is grown
    dilate: int = 2

    def __post_init__(self) -> None:
        if self.method not in FILTERS:
            raise ValueError(f"temporal filter must be one of {', '.join(FILTERS)}, got {self.method!r}")
        if not 1 <= int(self.frames) <= MAX_FRAMES:
            raise ValueError(f"frames must be in [1, {MAX_FRAMES}], got {self.frames}")
        if not 0 <= int(self.image_threshold) <= 255:
            raise ValueError(f"image_threshold must be in [0, 255], got {self.image_threshold}")
        if not 0 <= int(self.dilate) <= 32:
            raise ValueError(f"dilate must be in [0, 32], got {self.dilate}")


class LabelFilter:
    """Per-camera temporal label filter. See the module docstring. One thread calls :meth:`apply`."""

    def __init__(self, config: Optional[FilterConfig] = None) -> None:
        self.config = config or FilterConfig()
        self.resets = 0
        self._labels: list[np.ndarray] = []  # newest first
        self._conf: list[np.ndarray] = []  # as votes (float, > 0)
        self._published_conf: list[np.ndarray] = []  # as given
        self._age: Optional[np.ndarray] = None  # frames since the image last changed, per pixel (capped)
        self._image: Optional[np.ndarray] = None
        self._context: Any = None
        self._last_ns: Optional[int] = None

    def reset(self) -> None:
        if self._image is not None:
            self.resets += 1
        self._labels, self._conf, self._published_conf = [], [], []
        self._age, self._image, self._last_ns = None, None, None

    def configure(self, config: FilterConfig) -> None:
        """New options; the state restarts when they differ."""
        if config != self.config:
            self.config = config
            self.reset()

    def apply(self, labels: np.ndarray, confidence: np.ndarray, image: np.ndarray, stamp_ns: int = 0,
              context: Hashable = None) -> tuple[np.ndarray, np.ndarray]:
        """(labels, confidence) to publish for this frame. ``image``: the (H, W, 3) RGB frame the labels are of.

        The state restarts on a new ``context`` (vocabulary/model), a new image size or a stamp going back.
        Inputs are never modified; with ``none`` they are returned as they are.
        """
        if self.config.method == "none":
            return labels, confidence
        if labels.shape != image.shape[:2] or confidence.shape != labels.shape:
            raise ValueError(f"labels {labels.shape}, confidence {confidence.shape} and image {image.shape} differ")
        stamp_ns = int(stamp_ns)
        if (self._image is None or self._age is None or context != self._context or self._image.shape != image.shape
                or (self._last_ns is not None and stamp_ns < self._last_ns)):
            self.reset()
            self._context = context
            self._age = np.zeros(labels.shape, np.uint8)
        else:
            self._age = _aged(self._age, _changed(image, self._image, self.config.image_threshold, self.config.dilate))
        self._image, self._last_ns = image.copy(), stamp_ns
        n = self.config.frames
        history, confs, published = self._labels, self._conf, self._published_conf
        self._labels = [labels] + history[: n - 1]
        self._published_conf = [confidence] + published[: n - 1]
        self._conf = [None] + confs[: n - 1]  # as votes, filled lazily (only pixels in dispute need them)
        age = self._age
        # Pixels in dispute: some counted older vote differs from this frame's label. Elsewhere the vote is
        # unanimous and the output is this frame's label; the full vote runs on the disputed pixels only.
        dispute = np.zeros(labels.shape, bool)
        for j in range(1, len(self._labels)):
            dispute |= (self._labels[j] != labels) & (age >= j)
        idx = np.flatnonzero(dispute)
        if idx.size == 0:
            return labels, confidence
        votes_l = [lab.reshape(-1)[idx] for lab in self._labels]
        a = age.reshape(-1)[idx]
        # each frame's vote weight, 0 where it is not counted (older than the pixel's last change)
        weight = [_as_vote(c.reshape(-1)[idx]) for c in self._published_conf]
        for j in range(1, len(weight)):
            weight[j] *= a >= j
        # a label's support: the weights of every frame that voted for it (pairwise equalities computed once)
        support = [w.copy() for w in weight]
        for j in range(len(votes_l)):
            for k in range(j + 1, len(votes_l)):
                same = votes_l[j] == votes_l[k]
                support[j] += weight[k] * same
                support[k] += weight[j] * same
        best_w = support[0]
        pick = np.zeros(idx.size, np.int64)
        for k in range(1, len(votes_l)):  # newest first: a tie keeps the newer label
            better = (support[k] > best_w) & (a >= k)
            pick[better] = k
            best_w = np.where(better, support[k], best_w)
        out_l, out_c = labels.copy(), confidence.copy()
        stack_l = np.stack(votes_l)
        stack_c = np.stack([c.reshape(-1)[idx] for c in self._published_conf])
        cols = np.arange(idx.size)
        out_l.reshape(-1)[idx] = stack_l[pick, cols]
        out_c.reshape(-1)[idx] = stack_c[pick, cols]
        return out_l, out_c


def _as_vote(conf: np.ndarray) -> np.ndarray:
    """Confidences as vote weights: float in (0, 1] (uint8 wire values scaled; a zero still votes a little)."""
    c = conf.astype(np.float32) / 255.0 if conf.dtype == np.uint8 else conf.astype(np.float32)
    return np.maximum(c, 1e-3)


def _changed(image: np.ndarray, previous: np.ndarray, threshold: int, dilate: int) -> np.ndarray:
    """uint8 mask (255 = changed) of the pixels whose largest channel difference exceeds ``threshold``, grown."""
    diff = cv2.absdiff(image, previous)
    if diff.ndim == 3:
        planes = cv2.split(diff)
        diff = planes[0]
        for plane in planes[1:]:
            diff = cv2.max(diff, plane)
    _, mask = cv2.threshold(diff, threshold, 255, cv2.THRESH_BINARY)
    if dilate:
        mask = cv2.dilate(mask, np.ones((2 * dilate + 1, 2 * dilate + 1), np.uint8))
    return mask


def _aged(age: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """Frames since the last change per pixel: +1 (capped at :data:`MAX_FRAMES`), 0 where ``changed``."""
    older = cv2.min(cv2.add(age, 1), MAX_FRAMES)
    return cv2.bitwise_and(older, cv2.bitwise_not(changed))
