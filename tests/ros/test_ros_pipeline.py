"""segment_node's pipeline, cameras and vocabulary service, in-process over loopback DDS, with the model-free
``color_key`` segmenter (labels are a known function of the image: class i <-> key colour i).

* several cameras on one node: each camera's outputs carry its own frames only, never another camera's;
* every output carries a revision whose vocabulary its labels fit, and is published after that revision's
  latched vocabulary, also while the vocabulary changes under a stream;
* set_vocabulary: a second change while one encodes is answered "busy" at once; an encoding that outlives
  ``vocabulary_timeout`` is abandoned; one that outlives a reconfigure is dropped, never installed; the
  executor keeps answering meanwhile.
"""

from __future__ import annotations

import array
import threading
import time
from typing import Any, Iterator

import numpy as np
import pytest
from ros_harness import (
    RosClient,
    active_inprocess_node,
    image_array,
    latched,
    require_ros_or_skip,
    stamp_of,
    unique_stamp,
)

require_ros_or_skip()

from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from ovseg_ros.core.segmenters.color_key import key_colors  # noqa: E402
from ovseg_ros.msg import SegmentationInfo, Vocabulary as VocabularyMsg  # noqa: E402
from ovseg_ros.ros.segment_node import SegmentNode  # noqa: E402
from ovseg_ros.srv import SetVocabulary  # noqa: E402

OK = TransitionCallbackReturn.SUCCESS
CLASSES = ["floor", "wall", "ceiling", "door", "window", "person"]


def painted(class_id: int, frame_id: str, width: int = 40, height: int = 30) -> Any:
    """An rgb8 Image whose left half has class ``class_id``'s key colour, right half class 0's."""
    keys = key_colors(16)
    img = np.empty((height, width, 3), np.uint8)
    img[:, : width // 2] = keys[class_id]
    img[:, width // 2:] = keys[0]
    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = unique_stamp()
    msg.header.frame_id = frame_id
    msg.height, msg.width, msg.encoding, msg.step = height, width, "rgb8", width * 3
    buf = array.array("B")
    buf.frombytes(img.tobytes())
    msg.data = buf
    return msg


@pytest.fixture(scope="module")
def node(ros_session: None, namespace: str) -> Iterator[SegmentNode]:
    params = {"segmenter": "color_key", "cache_dir": "", "vocabulary": CLASSES, "cameras": ["front", "rear"],
              "diagnostics_period": 0.5, "vocabulary_timeout": 5.0}
    with active_inprocess_node(namespace, params, threads=6) as n:
        yield n


def _stream(client: RosClient, topics: dict[str, str], seconds: float, per_camera: dict[str, int]) -> None:
    pubs = {cam: client.publisher(f"{topics['ns']}/{cam}/image", Image) for cam in per_camera}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for cam, cls in per_camera.items():
            pubs[cam].publish(painted(cls, f"{cam}_optical"))
        time.sleep(1 / 30)


@pytest.fixture(scope="module")
def topics(node: SegmentNode, namespace: str) -> dict[str, str]:
    base = node.get_fully_qualified_name()
    return {"ns": namespace, "base": base}


def test_cameras_never_cross(node: SegmentNode, client: RosClient, topics: dict[str, str]) -> None:
    front = client.subscribe(f"{topics['base']}/front/semantic/labels", Image)
    rear = client.subscribe(f"{topics['base']}/rear/semantic/labels", Image)
    _stream(client, topics, 3.0, {"front": 3, "rear": 5})
    for col, cam, cls in ((front, "front", 3), (rear, "rear", 5)):
        msgs = col.snapshot()
        assert len(msgs) >= 10, f"{cam}: {len(msgs)} outputs in 3 s"
        for m in msgs:
            assert m.header.frame_id == f"{cam}_optical"
            labels = image_array(m)
            assert (labels[:, : m.width // 2] == cls).all() and (labels[:, m.width // 2:] == 0).all()
    diag = node.cameras
    assert [c.spec.name for c in diag] == ["front", "rear"]


def test_panoptic_min_area_drops_speckle_live(node: SegmentNode, client: RosClient, topics: dict[str, str]) -> None:
    """``panoptic_min_area`` (a live parameter): a 2x2 speckle of class 5 gets no panoptic segment while it is
    10, and one as soon as it is back to 0; the label image is unchanged either way."""
    from ovseg_ros.msg import PanopticSegmentation

    panoptic = client.subscribe(f"{topics['base']}/front/panoptic", PanopticSegmentation)
    pub = client.publisher(f"{topics['ns']}/front/image", Image)
    frame = painted(0, "front_optical")
    img = np.frombuffer(bytes(frame.data), np.uint8).reshape(frame.height, frame.width, 3).copy()
    img[10:12, 4:6] = key_colors(16)[5]
    frame.data = array.array("B", img.tobytes())

    def classes_for(min_area: int) -> tuple[set[int], np.ndarray]:
        node.set_parameters([Parameter("panoptic_min_area", value=min_area)])
        panoptic.clear()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            frame.header.stamp.sec, frame.header.stamp.nanosec = unique_stamp()
            pub.publish(frame)
            got = panoptic.wait_for(lambda m: stamp_of(m.header) == stamp_of(frame.header), timeout=0.5)
            if got is not None:
                return {s.class_id for s in got.segments}, image_array(got.segment_ids)
        raise AssertionError("no panoptic output")

    try:
        classes, ids = classes_for(10)
        assert 5 not in classes and (ids[10:12, 4:6] == 0).all() and (ids[:, 20:] > 0).all()
        classes, ids = classes_for(0)
        assert 5 in classes and (ids[10:12, 4:6] > 0).all()
    finally:
        node.set_parameters([Parameter("panoptic_min_area", value=0)])


def test_revisions_fit_their_vocabulary_under_churn(node: SegmentNode, client: RosClient,
                                                    topics: dict[str, str]) -> None:
    vocab = client.subscribe(f"{topics['base']}/vocabulary", VocabularyMsg, latched())
    info = client.subscribe(f"{topics['base']}/front/info", SegmentationInfo)
    labels = client.subscribe(f"{topics['base']}/front/semantic/labels", Image)
    stop = threading.Event()

    def stream_until_stopped() -> None:
        while not stop.is_set():
            _stream(client, topics, 0.2, {"front": 4})

    streamer = threading.Thread(target=stream_until_stopped)
    streamer.start()
    sizes = {}
    try:
        for k in range(6):
            n = 3 + (k % 3)  # 3, 4, 5 classes: class 4's colour is a label only when n = 5
            resp = client.call(SetVocabulary, f"{topics['base']}/set_vocabulary",
                               SetVocabulary.Request(classes=CLASSES[:n]), timeout=30)
            assert resp.success, resp.message
            sizes[resp.revision] = n
            time.sleep(0.4)
    finally:
        stop.set()
        streamer.join()
    by_stamp = {stamp_of(m.header): m for m in info.snapshot()}
    checked = 0
    for m in labels.snapshot():
        i = by_stamp.get(stamp_of(m.header))
        if i is None or i.vocabulary_revision not in sizes:
            continue
        arr = image_array(m)
        n = sizes[i.vocabulary_revision]
        assert ((arr < n) | (arr == 255)).all(), f"labels beyond the {n} classes of revision {i.vocabulary_revision}"
        left = arr[:, : m.width // 2]
        assert (left == left[0, 0]).all(), "one colour, one label: no output mixes two vocabularies"
        if n == 5:
            assert left[0, 0] == 4
        checked += 1
    assert checked >= 10
    seen = [v.revision for v in vocab.snapshot()]
    assert seen == sorted(seen), "latched vocabularies out of order"


def _slow_encode(node: SegmentNode, seconds: float, cooperative: bool = False) -> Any:
    """Make encode_vocabulary take ``seconds``; ``cooperative``: in 0.05 s batches that check for
    cancellation, as the text encoder does between its batches."""
    from ovseg_ros.core import cancel

    segmenter = node.segmenter
    inner = segmenter.encode_vocabulary

    def slow(vocabulary: Any) -> Any:
        for _ in range(int(seconds / 0.05)):
            if cooperative:
                cancel.check()
            time.sleep(0.05)
        return inner(vocabulary)

    segmenter.encode_vocabulary = slow  # test-only wrapper (instance attribute shadows the method)
    return lambda: segmenter.__dict__.pop("encode_vocabulary", None)


def test_reconfigure_cancels_an_encoding_for_the_old_model(node: SegmentNode) -> None:
    """The abandoned encoding stops at its next batch, and a change for the new model is not "busy"."""
    restore = _slow_encode(node, 20.0, cooperative=True)
    replies: list[Any] = []
    t = threading.Thread(target=lambda: replies.append(_call_set(node, ["stale", "classes"])))
    try:
        t.start()
        time.sleep(0.3)
        old_job = node.vocab.jobs._jobs["vocabulary"]
        assert not old_job.done.is_set()
        assert node.trigger_deactivate() == OK
        assert node.trigger_cleanup() == OK
        assert old_job.done.wait(2.0), "the abandoned encoding must stop at its next batch"
        t.join(5)
        assert replies and not replies[0].success
        assert node.trigger_configure() == OK
        assert node.trigger_activate() == OK
        resp = _call_set(node, ["floor", "door"])
        assert resp.success, resp.message
        assert node.vocab.binding.vocabulary.names == ["floor", "door"]
        assert _call_set(node, CLASSES).success
    finally:
        restore()


def _call_set(node: SegmentNode, classes: list[str]) -> Any:
    return node.vocab.srv_set_vocabulary(SetVocabulary.Request(classes=classes), SetVocabulary.Response())


def test_second_change_while_encoding_is_busy_and_executor_answers(node: SegmentNode, client: RosClient,
                                                                   topics: dict[str, str]) -> None:
    restore = _slow_encode(node, 1.5)
    try:
        first: list[Any] = []
        t = threading.Thread(target=lambda: first.append(_call_set(node, ["floor", "door"])))
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        second = client.call(SetVocabulary, f"{topics['base']}/set_vocabulary",
                             SetVocabulary.Request(classes=["wall"]), timeout=10)
        assert time.monotonic() - t0 < 1.0
        assert not second.success and second.message.startswith("busy:"), second.message
        t0 = time.monotonic()
        assert client.lifecycle_state(node.get_fully_qualified_name(), timeout=5) == "active"
        assert time.monotonic() - t0 < 1.0, "the executor must answer while a vocabulary encodes"
        t.join(10)
        assert first and first[0].success, first
    finally:
        restore()


def test_encoding_past_the_timeout_is_abandoned(node: SegmentNode) -> None:
    before = node.vocab.binding.vocabulary.revision
    node.set_parameters([Parameter("vocabulary_timeout", value=0.3)])
    restore = _slow_encode(node, 1.0)
    try:
        resp = _call_set(node, ["floor", "chair"])
        assert not resp.success and "not finished within" in resp.message
        time.sleep(1.0)  # the abandoned encoding ends; its result is not installed
        assert node.vocab.binding.vocabulary.revision == before
    finally:
        restore()
        node.set_parameters([Parameter("vocabulary_timeout", value=5.0)])


def test_encoding_across_a_reconfigure_is_dropped(node: SegmentNode) -> None:
    restore = _slow_encode(node, 1.5)
    replies: list[Any] = []
    t = threading.Thread(target=lambda: replies.append(_call_set(node, ["stale", "classes"])))
    try:
        t.start()
        time.sleep(0.3)
        assert node.trigger_deactivate() == OK
        assert node.trigger_cleanup() == OK
        t.join(5)
        assert replies and not replies[0].success
        assert "changing state" in replies[0].message or "reconfigured" in replies[0].message
        assert node.trigger_configure() == OK
        assert node.trigger_activate() == OK
        time.sleep(2.0)  # the old encoding finishes in the background: it must not be installed
        assert node.vocab.binding.vocabulary.names == CLASSES
    finally:
        restore()
