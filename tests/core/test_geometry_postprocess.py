from __future__ import annotations

import numpy as np
import torch

from ovseg_ros.core.geometry import short_side_size, slide_inference, sliding_windows, upsample_max
from ovseg_ros.core.postprocess import close_labels, colorize, make_palette, overlay, panoptic_from_semantic
from ovseg_ros.core.vocabulary import UNLABELED, Vocabulary


def test_sliding_windows_cover_and_snap_to_edges() -> None:
    wins = sliding_windows(336, 448, 224, 28)
    assert len(wins) == 5 * 9  # the authors' VOC figure: 5 x 9 windows at 336x448
    cover = np.zeros((336, 448), int)
    for y0, y1, x0, x1 in wins:
        assert y1 - y0 == 224 and x1 - x0 == 224
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1 and wins[-1][1] == 336 and wins[-1][3] == 448
    assert sliding_windows(100, 120, 224, 112) == [(0, 100, 0, 120)]  # smaller than one crop


def test_slide_inference_averages_overlaps() -> None:
    img = torch.arange(2 * 10 * 12, dtype=torch.float32).view(1, 2, 10, 12)[:, :1].repeat(1, 3, 1, 1)
    out = slide_inference(img, lambda c: c[:, :1] * 2, crop=6, stride=4, num_channels=1, batch_size=3)
    assert torch.allclose(out, img[:, :1] * 2)


def test_short_side_and_cap() -> None:
    assert short_side_size(480, 640, 320) == (320, 427)
    assert short_side_size(100, 1000, 200, max_long=1000) == (100, 1000)


def test_upsample_max_equals_full_argmax() -> None:
    torch.manual_seed(0)
    s = torch.randn(70, 5, 7)
    best, idx = upsample_max(s, (20, 30), chunk=16)
    full = torch.nn.functional.interpolate(s[None], size=(20, 30), mode="bilinear", align_corners=False)[0]
    assert torch.equal(idx, full.argmax(0)) and torch.allclose(best, full.max(0).values)


def test_close_labels_fills_a_hole_and_keeps_unlabeled() -> None:
    lab = np.full((9, 9), 2, np.int32)
    lab[4, 4] = 0
    assert close_labels(lab)[4, 4] == 2
    lab = np.full((9, 9), UNLABELED, np.int32)
    assert (close_labels(lab) == UNLABELED).all()


def test_panoptic_from_semantic_splits_things_and_merges_stuff() -> None:
    v = Vocabulary.from_request(["floor", "chair"], is_thing=[False, True])
    lab = np.full((10, 10), UNLABELED, np.int32)
    lab[0:2, :] = 0
    lab[8:10, :] = 0  # two floor regions -> one stuff segment
    lab[4:6, 0:2] = 1
    lab[4:6, 7:10] = 1  # two chairs -> two segments
    conf = np.full((10, 10), 0.5, np.float32)
    conf[4:6, 7:10] = 0.9
    pan = panoptic_from_semantic(lab, conf, v)
    assert [(s.class_id, s.area) for s in pan.segments] == [(0, 40), (1, 4), (1, 6)]
    floor, chair_a, chair_b = pan.segments
    assert not floor.is_thing and floor.bbox == (0, 0, 10, 10)
    assert chair_b.bbox == (7, 4, 3, 2) and abs(chair_b.score - 0.9) < 1e-6
    assert set(np.unique(pan.segment_ids)) == {0, 1, 2, 3}
    assert (pan.segment_ids[lab == UNLABELED] == 0).all()


def test_colorize_and_overlay() -> None:
    pal = make_palette(3)
    assert len({tuple(c) for c in pal}) == 3
    lab = np.array([[UNLABELED, 0], [1, 2]], np.int32)
    col = colorize(lab, pal)
    assert col.dtype == np.uint8 and col.shape == (2, 2, 3) and (col[0, 0] == 0).all() and (col[1, 1] == pal[2]).all()
    img = np.full((2, 2, 3), 100, np.uint8)
    ov = overlay(img, col, 0.5, lab)
    assert (ov[0, 0] == 100).all()


def test_core_never_imports_rclpy() -> None:
    import subprocess
    import sys

    code = ("import sys, ovseg_ros.core.segmenter as s, ovseg_ros.cli; s.list_segmenters(); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('rclpy', 'rosidl_runtime_py', 'sensor_msgs')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_panoptic_matches_per_component_reference_on_random_maps() -> None:
    """The vectorised version equals a direct per-component computation (areas, boxes, scores)."""
    import cv2

    rng = np.random.default_rng(3)
    v = Vocabulary.from_request(["floor", "chair", "cup"], is_thing=[False, True, True])
    lab = rng.integers(-1, 3, (24, 32)).astype(np.int32)
    conf = rng.random((24, 32)).astype(np.float32)
    pan = panoptic_from_semantic(lab, conf, v, min_area=2)
    expected = []
    for cls in (0, 1, 2):
        mask = (lab == cls).astype(np.uint8)
        comps = [mask.astype(bool)] if cls == 0 else [
            c == k for c in [cv2.connectedComponents(mask, connectivity=8)[1]] for k in range(1, c.max() + 1)]
        for region in comps:
            if region.sum() >= 2:
                ys, xs = np.nonzero(region)
                expected.append((cls, int(region.sum()), (int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1,
                                                          int(np.ptp(ys)) + 1), float(conf[region].mean())))
    got = [(s.class_id, s.area, s.bbox, s.score) for s in pan.segments]
    assert [g[:3] for g in got] == [e[:3] for e in expected]
    assert np.allclose([g[3] for g in got], [e[3] for e in expected])
    for s in pan.segments:
        assert (pan.segment_ids == s.id).sum() == s.area
    assert [s.id for s in pan.segments] == list(range(1, len(pan.segments) + 1))


def test_vocabulary_state_moves_tensor_fields() -> None:
    from dataclasses import dataclass

    import torch

    from ovseg_ros.core.segmenter import VocabularyState

    @dataclass(frozen=True)
    class S(VocabularyState):
        a: torch.Tensor = None  # type: ignore[assignment]
        b: tuple = ()

    st = S(Vocabulary.from_request(["x"]), torch.zeros(2), (torch.ones(1), "keep"))
    assert st.to("cpu") is st  # nothing to move
    moved = st.to("meta")
    assert moved.a.device.type == "meta" and moved.b[0].device.type == "meta" and moved.b[1] == "keep"
    assert st.a.device.type == "cpu"  # the original is untouched (states are immutable)
