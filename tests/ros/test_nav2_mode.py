"""Nav2 mode of segment_node, in-process with the model-free color_key segmenter: the vocabulary limit at
configure, and the order of LabelInfo/vocabulary and frames around a vocabulary change (a frame's ids are
always in the label map published last; frames of the previous revision still in flight are dropped)."""

from __future__ import annotations

import time
from typing import Any, Iterator

import numpy as np
import pytest
from ros_harness import require_ros_or_skip

require_ros_or_skip()

from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from ovseg_ros.ros.mailbox import Frame  # noqa: E402
from ovseg_ros.ros.pipeline import Item  # noqa: E402
from ovseg_ros.ros.segment_node import SegmentNode  # noqa: E402
from ovseg_ros.srv import SetVocabulary  # noqa: E402

PARAMS = {"segmenter": "color_key", "device": "cpu", "cache_dir": "", "publish_panoptic": False,
          "nav2_compatible": True, "vocabulary": ["floor", "wall", "person", "chair"]}


def make_node(namespace: str, **overrides: Any) -> SegmentNode:
    params = {**PARAMS, **overrides}
    return SegmentNode(namespace=namespace, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])


@pytest.fixture()
def node(ros_session: None, namespace: str) -> Iterator[SegmentNode]:
    n = make_node(namespace)
    assert n.trigger_configure() == TransitionCallbackReturn.SUCCESS
    try:
        yield n
    finally:
        n.destroy_node()


def test_configure_refuses_more_than_255_classes(ros_session: None, namespace: str) -> None:
    n = make_node(namespace, vocabulary=[f"thing {i}" for i in range(256)])
    try:
        assert n.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert "nav2_compatible" in n._last_transition_error and "256 classes" in n._last_transition_error
    finally:
        n.destroy_node()
    off = make_node(namespace, vocabulary=[f"thing {i}" for i in range(256)], nav2_compatible=False)
    try:
        assert off.trigger_configure() == TransitionCallbackReturn.SUCCESS  # mono16 outside Nav2 mode
    finally:
        off.destroy_node()


def test_labels_never_use_ids_missing_from_the_last_label_map(node: SegmentNode) -> None:
    log: list[tuple[str, int]] = []  # (output, revision or number of classes) in publish order

    class Recorder:
        def __init__(self, name: str, real: Any) -> None:
            self.name, self.real = name, real

        def publish(self, msg: Any) -> None:
            if self.name == "vocabulary":
                log.append(("vocabulary", len(msg.classes)))
            elif self.name == "labels":
                arr = np.frombuffer(bytes(msg.data), np.uint8)
                log.append(("labels", int(arr[arr != 255].max(initial=0))))
            self.real.publish(msg)

        def get_subscription_count(self) -> int:
            return 0

    cam = node.cameras[0]
    cam.pubs = {k: Recorder(k, v) for k, v in cam.pubs.items()}
    node._vocab_pub = Recorder("vocabulary", node._vocab_pub)
    node.gate.open()  # publish without subscribing to a camera
    segmenter = node.segmenter
    from ovseg_ros.core.segmenters.color_key import key_colors

    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :4] = key_colors(4)[1]  # "wall": id 1 in both vocabularies
    image[:, 4:] = key_colors(4)[3]  # "chair": id 3, absent from the second vocabulary
    old_binding = node.vocab.binding
    old_result = segmenter.segment(image, old_binding.state)
    assert int(old_result.labels.max()) == 3
    req = SetVocabulary.Request()
    req.classes = ["floor", "wall"]
    resp = node.vocab.srv_set_vocabulary(req, SetVocabulary.Response())
    assert resp.success, resp.message
    frame = Frame(_header(), image, time.monotonic())
    assert not cam.publish_item(Item(cam, frame, old_result, old_binding, 0, 1.0))  # in flight across the change
    new_binding = node.vocab.binding
    new_result = segmenter.segment(image, new_binding.state)
    assert cam.publish_item(Item(cam, frame, new_result, new_binding, 0, 1.0))
    assert [e for e in log if e[0] == "labels"] == [("labels", 1)]  # only the new revision's frame
    n_classes = None
    for kind, value in log:
        if kind == "vocabulary":
            n_classes = value
        else:
            assert n_classes is not None and value < n_classes, log
    # more than 255 classes: refused with the reason, nothing changes
    req.classes = [f"thing {i}" for i in range(300)]
    resp = node.vocab.srv_set_vocabulary(req, SetVocabulary.Response())
    assert not resp.success and "nav2_compatible" in resp.message
    assert len(node.vocab.binding.vocabulary) == 2


def _header() -> Any:
    from std_msgs.msg import Header

    h = Header()
    h.stamp.sec, h.frame_id = 7, "cam"
    return h


def test_points_output_follows_the_lifecycle(ros_session: None, namespace: str) -> None:
    n = make_node(namespace, publish_points=True, min_depth=0.3, max_depth=6.0, points_rgb=True, depth_buffer_mb=3)
    try:
        assert n.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert n.cameras[0].points is None  # subscriptions belong to the active state
        for _ in range(2):
            assert n.trigger_activate() == TransitionCallbackReturn.SUCCESS
            depth, info, cloud = n.cameras[0].points.topics
            assert depth.endswith("/depth/image") and info.endswith("/depth/camera_info")
            assert cloud.endswith("/segment_node/semantic/points")
            assert n.cameras[0].points._opts.min_depth == 0.3 and n.cameras[0].points._opts.rgb
            assert n.cameras[0].points._matcher.max_bytes == 3 * 2**20  # depth_buffer_mb
            points = n.cameras[0].points
            cam = n.cameras[0]
            assert n.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
            assert cam.points is None and points._closed
    finally:
        n.destroy_node()


def test_class_ids_at_the_255_limit(node: SegmentNode) -> None:
    """Stable ids in Nav2 mode: a change that would have to rename ids of the previous revision is refused with
    the reason and changes nothing; through a smaller vocabulary it works, with every id below 255."""
    def change(classes: list[str]) -> Any:
        req = SetVocabulary.Request()
        req.classes = classes
        return node.vocab.srv_set_vocabulary(req, SetVocabulary.Response())

    first = change([f"a{i}" for i in range(200)])
    assert first.success, first.message
    before = node.vocab.binding.vocabulary
    refused = change([f"b{i}" for i in range(200)])
    assert not refused.success and "two steps" in refused.message and refused.revision == first.revision
    assert node.vocab.binding.vocabulary is before  # nothing changed
    step = change(["a7"])
    assert step.success and list(step.class_ids) == [first.class_ids[7]]
    done = change([f"b{i}" for i in range(200)])
    assert done.success, done.message
    assert max(done.class_ids) < 255 and first.class_ids[7] not in done.class_ids
    assert node.vocab.binding.vocabulary.ids == tuple(done.class_ids)
