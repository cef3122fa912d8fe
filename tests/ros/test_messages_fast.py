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


@pytest.mark.parametrize("num_classes, id_offset", [(6, 0), (300, 0), (6, 40), (6, 400)])
def test_build_outputs_from_byte_codes_equal_the_int32_path(num_classes: int, id_offset: int) -> None:
    """build_outputs narrows the labels to byte codes once and feeds them to every output: each message equals
    the one built from the int32 labels directly (mono16 vocabularies keep the int32 path; published ids that
    are not the positions, mono8 and mono16, go through wire_labels either way)."""
    import types

    messages_or_skip()
    from std_msgs.msg import Header

    from ovseg_ros.core import postprocess
    from ovseg_ros.core.segmenter import SegmentationResult
    from ovseg_ros.core.vocabulary import Vocabulary
    from ovseg_ros.ros.outputs import Palette, build_outputs

    rng = np.random.default_rng(num_classes)
    names = [f"class{i}" for i in range(num_classes)]
    vocab = Vocabulary.from_request(names, is_thing=[i % 2 == 0 for i in range(num_classes)])
    if id_offset:
        vocab = vocab.with_ids([id_offset + 3 * i for i in range(num_classes)])
    labels = np.repeat(np.repeat(rng.integers(-1, num_classes, (6, 8)), 8, 0), 8, 1).astype(np.int32)
    confidence = rng.random(labels.shape).astype(np.float32)
    image = rng.integers(0, 256, (*labels.shape, 3), dtype=np.uint8)
    header = Header(frame_id="cam")
    item = types.SimpleNamespace(
        frame=types.SimpleNamespace(header=header, image=image),
        result=SegmentationResult(labels, confidence, vocab),
        binding=types.SimpleNamespace(segmenter_name="test"), inference_ms=1.0, dropped=0)
    out = dict(build_outputs(item, lambda _name: True, Palette(), 0.5, True, 2.0))

    def pixels(msg, dtype):
        return np.frombuffer(bytes(msg.data), dtype).reshape(msg.height, -1)

    wire, _, _ = messages_or_skip().wire_labels(labels, vocab)  # from the int32 labels
    assert np.array_equal(pixels(out["labels"], wire.dtype), wire)
    palette = postprocess.make_palette(num_classes)
    color = postprocess.colorize(labels, palette)
    assert np.array_equal(pixels(out["color"], np.uint8), color.reshape(labels.shape[0], -1))
    blended = postprocess.overlay(image, color, 0.5, labels)
    assert np.array_equal(pixels(out["overlay"], np.uint8), blended.reshape(labels.shape[0], -1))
    panoptic = postprocess.panoptic_from_semantic(labels, confidence, vocab)
    assert np.array_equal(pixels(out["panoptic"].segment_ids, np.int32), panoptic.segment_ids)
    got = [(s.id, s.class_id, s.is_thing, s.area) for s in out["panoptic"].segments]
    assert got == [(s.id, vocab.ids[s.class_id], s.is_thing, s.area) for s in panoptic.segments] and got
    positions, areas = ref_class_areas(labels, num_classes)
    ids = [vocab.ids[i] for i in positions]
    assert (list(out["info"].class_ids), list(out["info"].class_areas)) == (ids, areas)
