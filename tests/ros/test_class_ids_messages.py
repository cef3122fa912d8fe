"""Published class ids (issue 17, defect 5): one LUT from positions to the frame's own ids in every message."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from ros_harness import messages_or_skip

from ovseg_ros.core.segmenter import Segment
from ovseg_ros.core.vocabulary import Vocabulary


def vocab(n: int, ids: list[int] | None = None) -> Vocabulary:
    v = Vocabulary.from_request([f"class {i}" for i in range(n)], revision=5)
    return v.with_ids(ids) if ids is not None else v


def reference(labels: np.ndarray, ids: list[int], unlabeled: int) -> np.ndarray:
    return np.array([[unlabeled if p < 0 else ids[p] for p in row] for row in labels])


@pytest.mark.parametrize("n,ids,encoding", [
    (3, [7, 0, 254], "mono8"),
    (255, list(range(254, -1, -1)), "mono8"),
    (3, [2, 300, 1], "mono16"),  # an id beyond 254: mono16 even for 3 classes
    (400, list(range(1000, 1400)), "mono16"),
])
def test_wire_labels_map_positions_to_ids(n: int, ids: list[int], encoding: str) -> None:
    messages = messages_or_skip()
    rng = np.random.default_rng(n)
    labels = rng.integers(-1, n, (23, 31)).astype(np.int32)
    out, enc, unlabeled = messages.wire_labels(labels, vocab(n, ids))
    assert enc == encoding and unlabeled == (255 if encoding == "mono8" else 65535)
    assert out.dtype == (np.uint8 if encoding == "mono8" else np.uint16)
    np.testing.assert_array_equal(out, reference(labels, ids, unlabeled))
    # labels already in a wire dtype (a segmenter's uint8 output, 255 unlabeled) map the same way
    if n <= 255:
        codes = labels.astype(np.uint8)
        np.testing.assert_array_equal(messages.wire_labels(codes, vocab(n, ids))[0], out)


def test_values_outside_the_vocabulary_become_unlabeled() -> None:
    messages = messages_or_skip()
    labels = np.array([[-1, 0, 1, 2, 3, 999, -5]], np.int32)
    for ids, unlabeled in (([7, 0, 254], 255), ([7, 0, 300], 65535)):
        out, _, _ = messages.wire_labels(labels, vocab(3, ids))
        assert out.tolist() == [[unlabeled, ids[0], ids[1], ids[2], unlabeled, unlabeled, unlabeled]]


def test_identity_ids_are_the_old_encoding() -> None:
    messages = messages_or_skip()
    labels = np.array([[-1, 0], [1, 2]], np.int32)
    out, enc, unlabeled = messages.wire_labels(labels, vocab(3))
    assert enc == "mono8" and unlabeled == 255 and out.tolist() == [[255, 0], [1, 2]]


def test_every_message_carries_the_ids_of_its_own_vocabulary() -> None:
    messages = messages_or_skip()
    v = vocab(3, [7, 0, 254])
    msg = messages.vocabulary_msg(v, None, "color_key", "none")
    assert [(c.id, c.name) for c in msg.classes] == [(7, "class 0"), (0, "class 1"), (254, "class 2")]
    assert msg.label_encoding == "mono8" and msg.unlabeled_id == 255 and msg.revision == 5
    from std_msgs.msg import Header

    header = Header(frame_id="cam")
    seg = Segment(id=1, class_id=2, is_thing=True, score=0.5, area=4, bbox=(0, 0, 2, 2))
    pan = messages.panoptic_msg(header, v, SimpleNamespace(segment_ids=np.ones((2, 2), np.int32), segments=[seg]))
    assert (pan.segments[0].class_id, pan.segments[0].class_name) == (254, "class 2")
    wire, _, _ = messages.wire_labels(np.array([[2, 2], [0, -1]], np.int32), v)
    info = messages.info_msg(header, v, "color_key", 1.0, 1.0, 0, wire)
    assert list(info.class_ids) == [7, 254] and list(info.class_areas) == [1, 2]
    label_info_cls = messages.label_info_type()
    if label_info_cls is not None:
        li = messages.label_info_msg(label_info_cls, v, None)
        assert {(c.class_id, c.class_name) for c in li.class_map} == {(7, "class 0"), (0, "class 1"),
                                                                      (254, "class 2")}
