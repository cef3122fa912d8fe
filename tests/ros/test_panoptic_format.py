"""``panoptic_format``: ~/panoptic's id image as 32SC1, 16UC1 (while the ids fit) or none (segments only);
one message type, the image's encoding says which form."""

from __future__ import annotations

import numpy as np
import pytest
from ros_harness import messages_or_skip

from ovseg_ros.core.segmenter import PanopticResult, Segment
from ovseg_ros.core.vocabulary import Vocabulary


def _panoptic(max_id: int) -> PanopticResult:
    ids = np.zeros((48, 64), dtype=np.int32)
    ids[:24] = 1
    ids[24:, :32] = max_id
    segs = [Segment(1, 0, False, 0.9, 24 * 64, (0, 0, 64, 24)),
            Segment(max_id, 1, True, 0.8, 24 * 32, (0, 24, 32, 24))]
    return PanopticResult(ids, segs)


def _decode(img) -> np.ndarray:
    dtype = {"32SC1": np.int32, "16UC1": np.uint16}[img.encoding]
    arr = np.frombuffer(bytes(img.data), np.dtype(dtype).newbyteorder(">" if img.is_bigendian else "<"))
    assert img.step == img.width * np.dtype(dtype).itemsize
    return arr.reshape(img.height, img.width)


@pytest.mark.parametrize("form, max_id, encoding", [
    ("int32", 2, "32SC1"), ("uint16", 2, "16UC1"), ("uint16", 65535, "16UC1"),
    ("uint16", 65536, "32SC1"),  # ids past 16 bits: this frame in 32 bits, never wrapped
])
def test_id_image_forms(form: str, max_id: int, encoding: str) -> None:
    messages = messages_or_skip()
    vocab = Vocabulary.from_request(["wall", "chair"])
    pan = _panoptic(max_id)
    from std_msgs.msg import Header

    header = Header(frame_id="cam")
    msg = messages.panoptic_msg(header, vocab, pan, form=form)
    assert msg.segment_ids.encoding == encoding and msg.segment_ids.header.frame_id == "cam"
    np.testing.assert_array_equal(_decode(msg.segment_ids), pan.segment_ids)
    assert [s.id for s in msg.segments] == [1, max_id] and msg.segments[1].class_name == "chair"
    if encoding == "16UC1":
        assert len(msg.segment_ids.data) == pan.segment_ids.size * 2  # half the bytes of 32SC1


def test_segments_only_has_no_id_image() -> None:
    messages = messages_or_skip()
    from std_msgs.msg import Header

    msg = messages.panoptic_msg(Header(frame_id="cam"), Vocabulary.from_request(["wall", "chair"]), _panoptic(2),
                                form="segments_only")
    img = msg.segment_ids
    assert (img.height, img.width, img.encoding, len(img.data)) == (0, 0, "", 0)
    assert img.header.frame_id == "cam"
    assert [(s.id, s.class_id, s.area) for s in msg.segments] == [(1, 0, 24 * 64), (2, 1, 24 * 32)]
    assert msg.segments[1].bbox.y_offset == 24 and msg.segments[1].bbox.width == 32


def test_unknown_form_is_refused_by_builder_and_parameter() -> None:
    messages = messages_or_skip()
    from std_msgs.msg import Header

    from ovseg_ros.ros.params import LIVE, PARAMS, validate

    with pytest.raises(ValueError, match="panoptic_format"):
        messages.panoptic_msg(Header(), Vocabulary.from_request(["wall"]), _panoptic(1), form="png")
    values = {p.name: p.default for p in PARAMS}
    assert values["panoptic_format"] == "int32" and "panoptic_format" in LIVE
    assert validate("panoptic_format", "uint16", values) is None
    assert "int32" in (validate("panoptic_format", "uint8", values) or "")
    assert tuple(next(p for p in PARAMS if p.name == "panoptic_format").choices) == messages.PANOPTIC_FORMATS
