"""The fast post-processing equals the implementations it replaced (kept here, verbatim, as references)."""

from __future__ import annotations

from typing import Iterator

import cv2
import numpy as np
import pytest

from ovseg_ros.core.postprocess import class_codes, colorize, make_palette, overlay, panoptic_from_semantic
from ovseg_ros.core.segmenter import PanopticResult, Segment
from ovseg_ros.core.vocabulary import UNLABELED, Vocabulary


def reference_panoptic(labels, confidence, vocabulary, min_area=0, connectivity=8) -> PanopticResult:
    """The derivation before issue 10 (per-class full-image labelling, np.minimum.at boxes)."""
    h, w = labels.shape
    flat_labels = labels.ravel()
    provisional = np.full(h * w, -1, dtype=np.int64)
    owners: list[tuple[int, bool]] = []
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
    keep = area >= max(min_area, 1)
    final = np.zeros(n + 1, dtype=np.int32)
    final[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    ids = final[provisional + 1].reshape(h, w)
    segments = [
        Segment(int(final[k + 1]), cls, thing, float(score_sum[k] / area[k]), int(area[k]),
                (int(x0[k]), int(y0[k]), int(x1[k] - x0[k] + 1), int(y1[k] - y0[k] + 1)))
        for k, (cls, thing) in enumerate(owners)
        if keep[k]
    ]
    return PanopticResult(ids, segments)


def reference_colorize(labels, palette, unlabeled_color=(0, 0, 0)) -> np.ndarray:
    lut = np.vstack([np.asarray(unlabeled_color, np.uint8)[None], palette.astype(np.uint8)])
    idx = labels.astype(np.int64) + 1
    idx[(idx < 0) | (idx >= len(lut))] = 0
    return lut[idx]


def reference_overlay(image, color, alpha=0.5, labels=None) -> np.ndarray:
    blend = cv2.addWeighted(image, 1.0 - alpha, color, alpha, 0.0)
    if labels is not None:
        keep = labels == UNLABELED
        blend[keep] = image[keep]
    return blend


def random_map(rng: np.random.Generator, n_cls: int, h: int, w: int) -> np.ndarray:
    """Blobs of random size (nearest-upsampled noise) or pixel noise, with unlabeled and stray ids."""
    kind = rng.integers(0, 3)
    if kind == 0:
        return rng.integers(-1, n_cls, (h, w)).astype(np.int32)
    gh, gw = rng.integers(1, max(2, h // 2)), rng.integers(1, max(2, w // 2))
    small = rng.integers(-1, n_cls + (kind == 2), (gh, gw)).astype(np.int32)  # kind 2: ids beyond the vocabulary
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def assert_same(got: PanopticResult, want: PanopticResult) -> None:
    assert np.array_equal(got.segment_ids, want.segment_ids)
    assert [(s.id, s.class_id, s.is_thing, s.area, s.bbox) for s in got.segments] == \
        [(s.id, s.class_id, s.is_thing, s.area, s.bbox) for s in want.segments]
    assert np.allclose([s.score for s in got.segments], [s.score for s in want.segments], rtol=1e-9, atol=1e-12)


@pytest.fixture(params=[1, 0], ids=["cv-1-thread", "cv-threads"])
def cv_threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """The reference labels with OpenCV, single-threaded and in parallel stripes: both must number
    components as the fast derivation does."""
    old = cv2.getNumThreads()
    cv2.setNumThreads(request.param)
    try:
        yield request.param
    finally:
        cv2.setNumThreads(old)


def random_vocabulary(rng: np.random.Generator, n_cls: int) -> Vocabulary:
    return Vocabulary.from_request([f"c{i}" for i in range(n_cls)],
                                   is_thing=[bool(b) for b in rng.integers(0, 2, n_cls)])


def test_fast_panoptic_equals_reference_on_random_maps(cv_threads: int) -> None:
    rng = np.random.default_rng(10 + cv_threads)
    for trial in range(150):
        n_cls = int(rng.integers(1, 12))
        v = random_vocabulary(rng, n_cls)
        h, w = (int(x) for x in rng.integers(1, 70, 2))
        lab = random_map(rng, n_cls, h, w)
        conf = rng.random((h, w)).astype(np.float32)
        min_area = int(rng.choice([0, 0, 2, 5]))
        conn = int(rng.choice([4, 8]))
        assert_same(panoptic_from_semantic(lab, conf, v, min_area, conn),
                    reference_panoptic(lab, conf, v, min_area, conn))


def test_fast_panoptic_equals_reference_on_large_maps(cv_threads: int) -> None:
    """Frame-sized blob maps with stray pixels (many one-pixel components)."""
    rng = np.random.default_rng(20 + cv_threads)
    for trial in range(6):
        n_cls = int(rng.integers(2, 40))
        v = random_vocabulary(rng, n_cls)
        h, w = int(rng.integers(200, 490)), int(rng.integers(200, 650))
        small = rng.integers(-1, n_cls, (int(rng.integers(4, 80)), int(rng.integers(4, 80)))).astype(np.int32)
        lab = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
        noise = rng.random((h, w)) < 0.02
        lab[noise] = rng.integers(-1, n_cls, int(noise.sum()))
        conf = rng.random((h, w)).astype(np.float32)
        conn = int(rng.choice([4, 8]))
        assert_same(panoptic_from_semantic(lab, conf, v, 0, conn), reference_panoptic(lab, conf, v, 0, conn))


def test_fast_panoptic_general_path_large_vocabulary_and_uint8_confidence() -> None:
    rng = np.random.default_rng(4)
    v = Vocabulary.from_request([f"c{i}" for i in range(300)], is_thing=[i % 2 == 0 for i in range(300)])
    small = rng.integers(-1, 300, (12, 16)).astype(np.int32)
    lab = cv2.resize(small, (64, 48), interpolation=cv2.INTER_NEAREST)
    assert class_codes(lab, 300) is None  # > 255 classes: the general path
    conf = rng.random((48, 64)).astype(np.float32)
    assert_same(panoptic_from_semantic(lab, conf, v), reference_panoptic(lab, conf, v))
    # Wire-dtype confidence gives the same scores up to the byte quantisation.
    conf8 = np.rint(conf * 255).astype(np.uint8)
    got = panoptic_from_semantic(lab, conf8, v)
    want = reference_panoptic(lab, conf8.astype(np.float64) / 255, v)
    assert_same(got, want)


def test_fast_panoptic_refuses_bad_shapes() -> None:
    v = Vocabulary.from_request(["a"])
    with pytest.raises(ValueError, match="one size"):
        panoptic_from_semantic(np.zeros((4, 4), np.int32), np.zeros((4, 5), np.float32), v)
    with pytest.raises(ValueError, match="connectivity"):
        panoptic_from_semantic(np.zeros((4, 4), np.int32), np.zeros((4, 4), np.float32), v, connectivity=6)


def test_fast_colorize_and_overlay_equal_reference() -> None:
    rng = np.random.default_rng(5)
    for n_cls, lo, hi in [(20, -1, 22), (255, -1, 255), (300, -3, 310)]:
        lab = rng.integers(lo, hi, (31, 45)).astype(np.int32)
        pal = make_palette(n_cls)
        assert np.array_equal(colorize(lab, pal, (1, 2, 3)), reference_colorize(lab, pal, (1, 2, 3)))
        img = rng.integers(0, 256, (31, 45, 3), dtype=np.uint8)
        col = colorize(lab, pal)
        for alpha in (0.0, 0.3, 1.0):
            assert np.array_equal(overlay(img, col, alpha, lab), reference_overlay(img, col, alpha, lab))
        assert np.array_equal(overlay(img, col, 0.5), reference_overlay(img, col, 0.5))


def test_wire_encoded_labels_and_other_int_dtypes() -> None:
    rng = np.random.default_rng(6)
    lab = rng.integers(-1, 20, (30, 40)).astype(np.int32)
    pal = make_palette(20)
    wire = lab.astype(np.uint8)  # what encode_labels publishes: -1 -> 255
    img = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    assert np.array_equal(colorize(wire, pal), reference_colorize(lab, pal))
    col = colorize(lab, pal)
    assert np.array_equal(overlay(img, col, 0.5, wire), reference_overlay(img, col, 0.5, lab))
    v = Vocabulary.from_request([f"c{i}" for i in range(20)], is_thing=[i % 3 == 0 for i in range(20)])
    conf = rng.random((30, 40)).astype(np.float32)
    for dtype in (np.int64, np.int16):
        assert_same(panoptic_from_semantic(lab.astype(dtype), conf, v), reference_panoptic(lab, conf, v))


@pytest.mark.parametrize("n_classes", [4, 300])  # uint8 class codes, and the general path
@pytest.mark.parametrize("shape", [(4, 1), (3, 1), (1, 4), (4, 2)])
def test_thin_components_whose_crop_opencv_could_read_as_a_scalar(n_classes: int, shape: tuple[int, int]) -> None:
    """A one-pixel-wide thing of 4 rows gives a (4, 1) crop, which OpenCV's Python binding once took for a
    Scalar in ``cv2.add`` (a type error that failed every frame of the node)."""
    vocab = Vocabulary.from_request([f"object {i}" for i in range(n_classes)], is_thing=[True] * n_classes)
    labels = np.full((12, 12), UNLABELED, np.int32)
    labels[2: 2 + shape[0], 2: 2 + shape[1]] = n_classes - 1
    labels[8, 8:10] = 1
    conf = np.full(labels.shape, 0.5, np.float32)
    assert_same(panoptic_from_semantic(labels, conf, vocab), reference_panoptic(labels, conf, vocab))
