"""Semantic segmentation metrics from one confusion matrix.

Every number (mIoU, per-class IoU, pixel accuracy, mean accuracy) is read from a single integer confusion
matrix, so per-image matrices, per-rank matrices and the whole-run matrix add up exactly: a sharded run and
a single-process run give bit-identical results.

Rows are ground-truth classes ``0..K-1``; columns are predicted classes ``0..K-1`` plus one extra column
``K`` for "no class predicted" (a segmenter leaves pixels unlabeled when no class fits). Such pixels are
false negatives of their ground-truth class and no class's false positives. Ground-truth pixels equal to the
ignore label (or outside ``0..K-1``) are not counted at all.

Conventions as in mmsegmentation's ``IoUMetric`` (what the papers report): a class that never occurs in the
ground truth and is never predicted has IoU NaN and is left out of the mean; mean accuracy averages over
the classes present in the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: Value of "no class" in prediction maps handed to :meth:`ConfusionMatrix.update` (the core's UNLABELED).
NO_PREDICTION = -1


class ConfusionMatrix:
    """A (K, K+1) int64 matrix of pixel counts; see the module docstring for the layout."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"a confusion matrix needs at least one class, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
        """Add one image; returns that image's own (K, K+1) matrix (for per-image records).

        ``pred``: class ids, :data:`NO_PREDICTION` (or any value outside ``0..K-1``) = no class.
        ``gt``: class ids, :attr:`ignore_index` (or any value outside ``0..K-1``) = not scored.
        """
        m = self.image_matrix(pred, gt)
        self.matrix += m
        return m

    def image_matrix(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
        k = self.num_classes
        g = gt.astype(np.int64, copy=False).ravel()
        p = pred.astype(np.int64, copy=False).ravel()
        keep = (g >= 0) & (g < k) & (g != self.ignore_index)
        g, p = g[keep], p[keep]
        p = np.where((p >= 0) & (p < k), p, k)
        return np.bincount(g * (k + 1) + p, minlength=k * (k + 1)).reshape(k, k + 1)

    def add(self, matrix: np.ndarray) -> None:
        if matrix.shape != self.matrix.shape:
            raise ValueError(f"confusion matrix shape {matrix.shape} != {self.matrix.shape}")
        self.matrix += matrix.astype(np.int64)

    def scores(self) -> "SemanticScores":
        return semantic_scores(self.matrix)


@dataclass
class SemanticScores:
    """Metrics in [0, 1] (the report shows percentages). NaN: undefined for that class."""

    miou: float
    pixel_accuracy: float
    mean_accuracy: float
    iou: np.ndarray  # (K,) per class, NaN where the class is absent from GT and predictions
    accuracy: np.ndarray  # (K,) per class recall, NaN where absent from GT
    gt_pixels: np.ndarray  # (K,)
    pred_pixels: np.ndarray  # (K,)
    scored_pixels: int
    unlabeled_pixels: int  # scored pixels the segmenter left without a class

    def as_dict(self, class_names: Sequence[str]) -> dict:
        return {
            "mIoU": _num(self.miou),
            "pixel_accuracy": _num(self.pixel_accuracy),
            "mean_accuracy": _num(self.mean_accuracy),
            "scored_pixels": self.scored_pixels,
            "unlabeled_pixels": self.unlabeled_pixels,
            "per_class": [
                {"id": i, "name": n, "IoU": _num(self.iou[i]), "accuracy": _num(self.accuracy[i]),
                 "gt_pixels": int(self.gt_pixels[i]), "pred_pixels": int(self.pred_pixels[i])}
                for i, n in enumerate(class_names)
            ],
        }


def semantic_scores(matrix: np.ndarray) -> SemanticScores:
    """All semantic metrics of a (K, K+1) confusion matrix."""
    m = np.asarray(matrix, dtype=np.int64)
    k = m.shape[0]
    if m.ndim != 2 or m.shape[1] != k + 1:
        raise ValueError(f"expected a (K, K+1) confusion matrix, got {m.shape}")
    tp = np.diag(m[:, :k]).astype(np.float64)
    gt = m.sum(axis=1)  # includes pixels left unlabeled
    pred = m[:, :k].sum(axis=0)
    union = gt + pred - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
        acc = np.where(gt > 0, tp / np.maximum(gt, 1), np.nan)
    total = int(gt.sum())
    return SemanticScores(
        miou=float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        pixel_accuracy=float(tp.sum() / total) if total else float("nan"),
        mean_accuracy=float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
        iou=iou, accuracy=acc, gt_pixels=gt, pred_pixels=pred,
        scored_pixels=total, unlabeled_pixels=int(m[:, k].sum()),
    )


def sparse(matrix: np.ndarray) -> list[list[int]]:
    """Non-zero entries as [row, column, count] (compact per-image records)."""
    rows, cols = np.nonzero(matrix)
    return [[int(r), int(c), int(matrix[r, c])] for r, c in zip(rows, cols)]


def dense(entries: Sequence[Sequence[int]], shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`sparse`."""
    out = np.zeros(shape, dtype=np.int64)
    for r, c, n in entries:
        out[r, c] += n
    return out


def _num(x: float) -> float | None:
    """JSON-friendly: NaN -> None."""
    x = float(x)
    return None if np.isnan(x) else x
