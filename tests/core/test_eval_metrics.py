"""ovseg_ros.eval metrics on small cases computed by hand (confusion-matrix metrics and COCO-style PQ)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ovseg_ros.eval.metrics import ConfusionMatrix, dense, semantic_scores, sparse
from ovseg_ros.eval.panoptic import FN, FP, IOU, IOU_SCALE, TP, SegmentInfo, pq_average, pq_image_stats


def test_confusion_metrics_by_hand() -> None:
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [-1, 2, 0]])  # -1: the segmenter left the pixel unlabeled
    cm = ConfusionMatrix(3)
    m = cm.update(pred, gt)
    assert m.tolist() == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]
    s = cm.scores()
    # IoU: class 0 1/(2+1-1), class 1 1/(2+2-1), class 2 1/(1+1-1); the ignored pixel counts nowhere.
    assert s.iou.tolist() == pytest.approx([1 / 2, 1 / 3, 1.0])
    assert s.miou == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    assert s.pixel_accuracy == pytest.approx(3 / 5)
    assert s.mean_accuracy == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert s.scored_pixels == 5 and s.unlabeled_pixels == 1


def test_absent_class_is_left_out_of_the_means_and_out_of_range_values() -> None:
    cm = ConfusionMatrix(4, ignore_index=9)
    cm.update(np.array([[0, 1, 7]]), np.array([[0, 1, 9]]))  # 7: no such class -> no prediction
    cm.update(np.array([[5]]), np.array([[1]]))
    s = cm.scores()
    assert math.isnan(s.iou[2]) and math.isnan(s.iou[3]) and math.isnan(s.accuracy[3])
    assert s.miou == pytest.approx((1.0 + 0.5) / 2)
    assert s.pixel_accuracy == pytest.approx(2 / 3)
    # A class predicted but absent from the ground truth has IoU 0 and no accuracy.
    cm.update(np.array([[3]]), np.array([[0]]))
    s = cm.scores()
    assert s.iou[3] == 0.0 and math.isnan(s.accuracy[3])


def test_sparse_round_trip_and_additivity() -> None:
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 5, (7, 9)) for _ in range(4)]
    preds = [rng.integers(-1, 5, (7, 9)) for _ in range(4)]
    whole = ConfusionMatrix(5)
    parts = np.zeros_like(whole.matrix)
    for p, g in zip(preds, gts):
        m = whole.update(p, g)
        parts += dense(sparse(m), m.shape)
    assert np.array_equal(parts, whole.matrix)
    assert semantic_scores(parts).miou == whole.scores().miou


def test_size_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        ConfusionMatrix(2).update(np.zeros((2, 2)), np.zeros((2, 3)))


def _pq_case():
    """4x4 image. GT: segment 1 (class 0, thing) = columns 0-1; 2 (class 1, stuff) = column 2;
    column 3: void in rows 0-1, crowd segment 3 (class 0) in rows 2-3."""
    gt = np.zeros((4, 4), np.int32)
    gt[:, 0:2] = 1
    gt[:, 2] = 2
    gt[2:, 3] = 3
    gt_segments = {1: SegmentInfo(0), 2: SegmentInfo(1), 3: SegmentInfo(0, iscrowd=True)}
    pred = np.zeros((4, 4), np.int32)
    pred[0:3, 0:2] = 10  # 6 px on segment 1: IoU 6/8 -> match
    pred[0:2, 2:4] = 11  # 2 px on segment 2, 2 on void: IoU 2/(4+4-2-2) = 0.5, not > 0.5 -> no match
    pred[2:, 3] = 12  # on the crowd region of its own class -> ignored
    return gt, gt_segments, pred


def test_pq_by_hand_strict_threshold_void_and_crowd() -> None:
    gt, gt_segments, pred = _pq_case()
    stats = pq_image_stats(gt, gt_segments, pred, {10: SegmentInfo(0), 11: SegmentInfo(1), 12: SegmentInfo(0)}, 2)
    assert stats[0, [TP, FP, FN]].tolist() == [1, 0, 0] and stats[0, IOU] == 750_000_000
    # Segment 11 is unmatched; half of it (not more) lies on void, so it is a false positive.
    assert stats[1, [TP, FP, FN]].tolist() == [0, 1, 1] and stats[1, IOU] == 0
    all_ = pq_average(stats)
    assert (all_.pq, all_.sq, all_.rq, all_.n) == pytest.approx((0.375, 0.375, 0.5, 2))
    things = pq_average(stats, [True, False], "things")
    stuff = pq_average(stats, [True, False], "stuff")
    assert (things.pq, things.sq, things.rq) == pytest.approx((0.75, 0.75, 1.0))
    assert (stuff.pq, stuff.sq, stuff.rq, stuff.n) == pytest.approx((0.0, 0.0, 0.0, 1))


def test_pq_crowd_of_another_class_and_mostly_void_predictions() -> None:
    gt, gt_segments, pred = _pq_case()
    # Segment 12 now claims class 1: the crowd region is class 0's, so 12 is a false positive of class 1.
    stats = pq_image_stats(gt, gt_segments, pred, {10: SegmentInfo(0), 11: SegmentInfo(1), 12: SegmentInfo(1)}, 2)
    assert stats[1, FP] == 2
    # A prediction with 3 of 4 pixels on void is ignored.
    pred2 = np.zeros((4, 4), np.int32)
    pred2[0:2, 3] = 5
    pred2[2, 3] = 5
    pred2[0, 2] = 5  # 2 void + 1 crowd(class 0) + 1 stuff pixel
    stats = pq_image_stats(gt, gt_segments, pred2, {5: SegmentInfo(0)}, 2)
    assert stats[:, FP].tolist() == [0, 0] and stats[:, FN].tolist() == [1, 1]


def test_pq_perfect_prediction_and_exact_iou_units() -> None:
    gt, gt_segments, _ = _pq_case()
    stats = pq_image_stats(gt, gt_segments, gt * 7, {7: SegmentInfo(0), 14: SegmentInfo(1), 21: SegmentInfo(0)}, 2)
    assert stats[:, TP].tolist() == [1, 1] and stats[:, IOU].tolist() == [IOU_SCALE, IOU_SCALE]
    assert pq_average(stats).pq == 1.0
    with pytest.raises(ValueError, match="outside"):
        pq_image_stats(gt, gt_segments, gt, {1: SegmentInfo(5)}, 2)
