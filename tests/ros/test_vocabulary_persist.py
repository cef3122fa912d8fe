"""Persistence of the runtime vocabulary in-process (issue 17, defect 6): each revision is on disk before it is
published, a failed write is a warning (the change still applies), a reconfigure continues ids and revisions."""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from ros_harness import require_ros_or_skip

require_ros_or_skip()

from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from ovseg_ros.ros.segment_node import SegmentNode  # noqa: E402
from ovseg_ros.srv import SetVocabulary  # noqa: E402

SUCCESS = TransitionCallbackReturn.SUCCESS


@pytest.fixture()
def node(ros_session: None, namespace: str, tmp_path: Path) -> Iterator[SegmentNode]:
    params = {"segmenter": "color_key", "device": "cpu", "cache_dir": str(tmp_path), "publish_panoptic": False,
              "vocabulary": ["floor", "wall", "person"]}
    n = SegmentNode(namespace=namespace, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    assert n.trigger_configure() == SUCCESS
    try:
        yield n
    finally:
        n.destroy_node()


def change(node: SegmentNode, classes: list[str]) -> Any:
    req = SetVocabulary.Request()
    req.classes = classes
    return node.vocab.srv_set_vocabulary(req, SetVocabulary.Response())


def test_each_revision_is_saved_before_it_is_published(node: SegmentNode) -> None:
    path = node.vocab.store.path
    on_disk: list[tuple[int, int]] = []  # (revision published, revision in the file at that moment)
    publish = node._publish_latched

    def spy(binding: Any, stamp: Any) -> None:
        on_disk.append((binding.vocabulary.revision, json.loads(path.read_text())["revision"]))
        publish(binding, stamp)

    hooks = node.vocab.hooks
    node.vocab.hooks = dataclasses.replace(hooks, announce=spy)  # test-only spy on the latched publish
    try:
        for classes in (["wall", "door"], ["door", "floor"]):
            assert change(node, classes).success
    finally:
        node.vocab.hooks = hooks
    assert len(on_disk) == 2 and all(published == saved for published, saved in on_disk), on_disk


def test_a_failed_write_warns_and_the_change_still_applies(node: SegmentNode, tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    node.vocab.store.path = blocker / "vocabulary.json"  # its folder is a file: every write fails (also as root)
    resp = change(node, ["door"])
    assert resp.success, resp.message
    assert [c.name for c in node.vocab.binding.vocabulary.classes] == ["door"]


def test_a_reconfigure_continues_ids_and_revisions_and_restores_the_vocabulary(node: SegmentNode) -> None:
    resp = change(node, ["person", "door"])
    assert resp.success and list(resp.class_ids) == [2, 3]
    assert node.trigger_cleanup() == SUCCESS
    assert node.trigger_configure() == SUCCESS
    v = node.vocab.binding.vocabulary
    assert v.names == ["person", "door"] and v.ids == (2, 3) and v.revision == resp.revision + 1
    # back to the configured vocabulary: the returning names get their former ids back
    again = change(node, ["floor", "wall", "person"])
    assert again.success and list(again.class_ids) == [0, 1, 2]



def test_mask_cloud_panoptic_and_info_of_a_frame_carry_the_same_stable_ids(node: SegmentNode) -> None:
    """Every output of one frame goes through the same id look-up (the cloud's labels equal the mask)."""
    import time

    import numpy as np
    from std_msgs.msg import Header

    from ovseg_ros.core.segmenters.color_key import key_colors
    from ovseg_ros.ros.mailbox import Frame
    from ovseg_ros.ros.pipeline import Item

    resp = change(node, ["wall", "person", "tree"])  # wall 1, person 2, tree 3: ids are not positions
    assert resp.success and list(resp.class_ids) == [1, 2, 3]
    node.set_parameters([Parameter("publish_panoptic", value=True)])
    published: dict[str, Any] = {}
    cloud: dict[str, Any] = {}

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def publish(self, msg: Any) -> None:
            published[self.name] = msg

        def get_subscription_count(self) -> int:
            return 0

    class Points:
        def publish(self, header: Any, labels: Any, confidence: Any, image: Any, unlabeled_id: int = 0,
                    **_: Any) -> None:
            cloud.update(labels=np.asarray(labels), unlabeled=unlabeled_id)

        def depth_cue(self, header: Any) -> None:  # no depth image: the tracker uses masks alone
            return None

        def destroy(self) -> None:
            pass

    cam = node.cameras[0]
    cam.pubs = {k: Recorder(k) for k in cam.pubs}
    cam.points = Points()
    node.gate.open()  # publish without subscribing to a camera
    image = np.zeros((8, 12, 3), np.uint8)
    for k in range(3):
        image[:, 4 * k:4 * k + 4] = key_colors(3)[k]
    binding = node.vocab.binding
    result = node.segmenter.segment(image, binding.state)
    h = Header()
    h.stamp.sec, h.frame_id = 7, "cam"
    assert cam.publish_item(Item(cam, Frame(h, image, time.monotonic()), result, binding, 0, 1.0))
    mask = np.frombuffer(bytes(published["labels"].data), np.uint8).reshape(8, 12)
    assert mask[0, ::4].tolist() == [1, 2, 3]
    np.testing.assert_array_equal(cloud["labels"], mask)
    assert cloud["unlabeled"] == 255
    assert sorted(published["info"].class_ids) == [1, 2, 3]
    assert sorted(s.class_id for s in published["panoptic"].segments) == [1, 2, 3]
    assert {s.class_id: s.class_name for s in published["panoptic"].segments} == {1: "wall", 2: "person", 3: "tree"}
