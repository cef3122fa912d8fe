"""The one-pass label/confidence encoders and class areas equal the implementations they replaced."""

from __future__ import annotations

import numpy as np
import pytest
from ros_harness import messages_or_skip

from ovseg_ros.core.vocabulary import UNLABELED



def ref_encode_labels(labels, num_classes):
    dtype, unlabeled = (np.uint8, 255) if num_classes <= 255 else (np.uint16, 65535)
    out = labels.astype(dtype)
    out[labels == UNLABELED] = unlabeled
    return out


def ref_encode_confidence(confidence):
    return np.clip(np.rint(confidence * 255.0), 0, 255).astype(np.uint8)


def ref_class_areas(labels, num_classes):
    counts = np.bincount(labels.ravel().astype(np.int64) + 1, minlength=num_classes + 1)[1:]
    present = np.nonzero(counts)[0]
    return [int(c) for c in present], [int(counts[c]) for c in present]


@pytest.mark.parametrize("num_classes", [1, 20, 255, 256, 3000])
def test_labels_and_areas_equal_reference(num_classes: int) -> None:
    messages = messages_or_skip()
    rng = np.random.default_rng(num_classes)
    labels = rng.integers(-1, num_classes, (37, 53)).astype(np.int32)
    enc, encoding = messages.encode_labels(labels, num_classes)
    assert encoding == ("mono8" if num_classes <= 255 else "mono16")
    assert enc.dtype == ref_encode_labels(labels, num_classes).dtype
    assert np.array_equal(enc, ref_encode_labels(labels, num_classes))
    assert messages.encode_labels(enc, num_classes)[0] is enc  # already in the wire dtype: no copy
    assert messages.class_areas(labels, num_classes) == ref_class_areas(labels, num_classes)
    if num_classes <= 255:  # the wire labels give the same areas
        assert messages.class_areas(enc, num_classes) == ref_class_areas(labels, num_classes)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_confidence_equals_reference_including_halves_and_out_of_range(dtype: type) -> None:
    messages = messages_or_skip()
    rng = np.random.default_rng(1)
    conf = rng.uniform(-0.2, 1.2, (41, 67)).astype(dtype)
    conf[0, :] = (np.arange(67) + 0.5) / 255.0  # exact .5 steps: round half to even
    conf[1, :5] = [0.0, 1.0, -0.0, 0.5, 127.5 / 255]
    got = messages.encode_confidence(conf)
    want = ref_encode_confidence(conf)
    # Identical, except that a product a rounding error away from a .5 step may round either way (OpenCV
    # scales in double, numpy in the input's precision): at most one level there.
    exact = conf.astype(np.float64) * 255.0
    tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-4
    assert got.dtype == np.uint8 and np.array_equal(got[~tie], want[~tie])
    assert np.abs(got[tie].astype(int) - want[tie]).max(initial=0) <= 1 and tie.sum() < 0.05 * tie.size
    as_u8 = got.copy()
    assert messages.encode_confidence(as_u8) is as_u8
