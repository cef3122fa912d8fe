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
            diff = cv2.absdiff(image, self._image)
            if diff.ndim == 3:
                diff = diff.max(axis=2)
            changed = (diff > self.config.image_threshold).view(np.uint8)
            if self.config.dilate:
                k = 2 * self.config.dilate + 1
                changed = cv2.dilate(changed, np.ones((k, k), np.uint8))
            np.minimum(self._age + 1, MAX_FRAMES, out=self._age)
            self._age[changed.view(bool)] = 0
        self._image, self._last_ns = image.copy(), stamp_ns
        conf = confidence.astype(np.float32) / 255.0 if confidence.dtype == np.uint8 else confidence.astype(np.float32)
        n = self.config.frames
        self._labels = [labels] + self._labels[: n - 1]
        self._conf = [np.maximum(conf, 1e-3)] + self._conf[: n - 1]  # a zero-confidence label still votes a little
        self._published_conf = [confidence] + self._published_conf[: n - 1]
        # weight of each kept frame's label: the confidences of the counted frames that agree with it
        age = self._age
        best_w = np.zeros(labels.shape, np.float32)
        out_labels, out_conf = labels, confidence
        for k in range(len(self._labels)):  # newest first: a tie keeps the newer label
            if k and not (age >= k).any():
                break
            w = np.zeros(labels.shape, np.float32)
            for j in range(len(self._labels)):
                counted = self._labels[j] == self._labels[k]
                if j:
                    counted &= age >= j
                w += np.where(counted, self._conf[j], 0.0)
            if k:
                w[age < k] = 0.0
                better = w > best_w
                out_labels = np.where(better, self._labels[k], out_labels)
                out_conf = np.where(better, self._published_conf[k], out_conf)
            best_w = np.maximum(best_w, w)
        return out_labels, out_conf
