"""Integration tests of the real segment_node (subprocess of the built package) over loopback DDS.

One node (tiny random-weight model) serves the whole module; tests run in file order: the query before
any frame comes first and the lifecycle test last. Every output, service and refusal is checked, and after
each bad input the node must still answer with outputs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from ros_harness import (
    NodeProcess,
    RosClient,
    image_array,
    latched,
    make_image,
    publish_until,
    require_ros_or_skip,
    same_header,
    stamp_of,
)

require_ros_or_skip()

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from ovseg_ros.msg import PanopticSegmentation, SegmentationInfo, Vocabulary  # noqa: E402
from ovseg_ros.srv import GetVocabulary, Query, SetVocabulary  # noqa: E402

SMALL = ["floor", "chair", "person, people", "door"]


class Node:
    """The node under test and the client-side subscriptions to its outputs."""

    def __init__(self, proc: NodeProcess, client: RosClient, namespace: str) -> None:
        self.proc, self.client, self.ns = proc, client, namespace
        self.fqn = proc.fqn
        c = client
        self.image_pub = c.publisher(f"{namespace}/image", Image)
        self.labels = c.subscribe(f"{self.fqn}/semantic/labels", Image)
        self.confidence = c.subscribe(f"{self.fqn}/semantic/confidence", Image)
        self.panoptic = c.subscribe(f"{self.fqn}/panoptic", PanopticSegmentation)
        self.info = c.subscribe(f"{self.fqn}/info", SegmentationInfo)
        self.vocabulary = c.subscribe(f"{self.fqn}/vocabulary", Vocabulary, latched())
        self.diagnostics = c.subscribe("/diagnostics", DiagnosticArray)

    def srv(self, name: str) -> str:
        return f"{self.fqn}/{name}"

    def roundtrip(self, image: Any = None, timeout: float = 30.0) -> tuple[Image, list[Image]]:
        """Publish frames until one comes back as labels; (labels message, frames sent)."""
        make = (lambda i: make_image()) if image is None else (lambda i: image(i))
        hit, sent = publish_until(
            self.image_pub, make, self.labels,
            lambda m, sent: any(same_header(m.header, s.header) for s in sent), timeout=timeout)
        assert hit is not None, f"no labels within {timeout} s; node log:\n{self.proc.output()[-3000:]}"
        return hit, sent

    def assert_still_serving(self) -> None:
        assert self.proc.alive(), self.proc.output()[-3000:]
        self.roundtrip()

    def diag_values(self, predicate: Any = lambda kv: True, timeout: float = 15.0) -> dict[str, str]:
        def match(msg: DiagnosticArray) -> bool:
            return any(self.fqn in s.name and predicate({v.key: v.value for v in s.values}) for s in msg.status)

        msg = self.diagnostics.wait_for(match, timeout, new_only=True)
        assert msg is not None, "no matching /diagnostics message"
        status = next(s for s in msg.status if self.fqn in s.name)
        return {v.key: v.value for v in status.values}

    def set_vocabulary(self, classes: list[str], descriptions: Any = (), is_thing: Any = ()) -> Any:
        req = SetVocabulary.Request(classes=list(classes), descriptions=list(descriptions), is_thing=list(is_thing))
        return self.client.call(SetVocabulary, self.srv("set_vocabulary"), req, timeout=120.0)

    def revision(self) -> int:
        return self.client.call(GetVocabulary, self.srv("get_vocabulary"), GetVocabulary.Request()).vocabulary.revision


@pytest.fixture(scope="module")
def node(client: RosClient, namespace: str, fast_params: dict, tmp_path_factory: Any) -> Iterator[Node]:
    proc = NodeProcess(namespace, fast_params, tmp_path_factory.mktemp("node"))
    n = Node(proc, client, namespace)
    try:
        assert n.vocabulary.wait_for(timeout=120.0) is not None, f"node never configured:\n{proc.output()}"
        assert client.lifecycle_state(n.fqn) == "active"
        yield n
    finally:
        code = proc.stop()
        out = proc.output()
        assert "Traceback" not in out, out
        assert code == 0, f"exit code {code}:\n{out[-3000:]}"


# --- services before any frame -----------------------------------------------------------------------
def test_query_before_any_frame_fails_clearly(node: Node) -> None:
    resp = node.client.call(Query, node.srv("query"), Query.Request(texts=["a chair"]))
    assert not resp.success
    assert "no frame has been received yet" in resp.message and "request has no image" in resp.message


# --- outputs -------------------------------------------------------------------------------------------
def test_outputs_types_encodings_sizes_headers_and_revisions(node: Node) -> None:
    vocab = node.vocabulary.wait_for()
    labels, sent = node.roundtrip()
    src = next(s for s in sent if same_header(labels.header, s.header))
    key = stamp_of(src.header)
    conf = node.confidence.wait_for(lambda m: stamp_of(m.header) == key)
    pan = node.panoptic.wait_for(lambda m: stamp_of(m.header) == key)
    info = node.info.wait_for(lambda m: stamp_of(m.header) == key)
    assert conf is not None and pan is not None and info is not None
    for msg in (labels, conf, pan, info, pan.segment_ids):
        assert same_header(msg.header, src.header)  # stamp and frame_id copied exactly
    assert (labels.encoding, conf.encoding, pan.segment_ids.encoding) == ("mono8", "mono8", "32SC1")
    for img in (labels, conf, pan.segment_ids):
        assert (img.width, img.height) == (src.width, src.height)
    lab = image_array(labels)
    n = len(vocab.classes)
    assert vocab.label_encoding == "mono8" and vocab.unlabeled_id == 255 and n == len(SMALL)
    assert set(np.unique(lab).tolist()) <= set(range(n)) | {255}
    assert info.vocabulary_revision == pan.vocabulary_revision == vocab.revision >= 1
    assert info.segmenter == "dense_clip" and info.latency_ms > 0 and info.inference_ms > 0
    present = {c: int((lab == c).sum()) for c in np.unique(lab).tolist() if c != 255}
    assert dict(zip(info.class_ids, info.class_areas)) == present
    ids = image_array(pan.segment_ids)
    assert {s.id for s in pan.segments} == set(np.unique(ids).tolist()) - {0}
    for s in pan.segments:
        assert s.class_id < n and s.class_name == vocab.classes[s.class_id].name
        assert s.area == int((ids == s.id).sum()) and 0.0 <= s.score <= 1.0
        assert s.bbox.width > 0 and s.bbox.height > 0 and s.bbox.x_offset + s.bbox.width <= src.width


def test_color_and_overlay_when_subscribed(node: Node) -> None:
    color = node.client.subscribe(f"{node.fqn}/semantic/color", Image)
    overlay = node.client.subscribe(f"{node.fqn}/overlay", Image)
    try:
        hit, sent = publish_until(
            node.image_pub, lambda i: make_image(), overlay,
            lambda m, sent: any(same_header(m.header, s.header) for s in sent), timeout=30)
        assert hit is not None
        col = color.wait_for(lambda m: same_header(m.header, hit.header))
        assert col is not None
        for img in (hit, col):
            assert img.encoding == "rgb8" and (img.width, img.height) == (64, 48)
            assert image_array(img).shape == (48, 64, 3)
    finally:
        node.client.unsubscribe(color)
        node.client.unsubscribe(overlay)


def test_vocabulary_and_label_info_are_latched_for_late_subscribers(node: Node) -> None:
    late = node.client.subscribe(f"{node.fqn}/vocabulary", Vocabulary, latched())
    msg = late.wait_for(timeout=15)
    node.client.unsubscribe(late)
    assert msg is not None, "a late subscriber did not get the latched vocabulary"
    assert [c.name for c in msg.classes] == ["floor", "chair", "person", "door"]
    assert [c.id for c in msg.classes] == [0, 1, 2, 3]
    assert list(msg.classes[2].synonyms) == ["people"] and msg.classes[2].is_thing
    assert not msg.classes[0].is_thing  # floor is stuff
    assert all(len(c.prompts) >= 1 for c in msg.classes)
    assert msg.segmenter == "dense_clip" and msg.model.startswith("ovseg-tiny-vit@file:")
    try:
        from vision_msgs.msg import LabelInfo
    except ImportError:
        pytest.skip("vision_msgs is not installed here: ~/label_info is not published (checked the vocabulary)")
    li = node.client.subscribe(f"{node.fqn}/label_info", LabelInfo, latched()).wait_for(timeout=15)
    assert li is not None
    assert [(c.class_id, c.class_name) for c in li.class_map] == [(i, c.name) for i, c in enumerate(msg.classes)]
    assert 255 not in [c.class_id for c in li.class_map]


def test_get_vocabulary(node: Node) -> None:
    resp = node.client.call(GetVocabulary, node.srv("get_vocabulary"), GetVocabulary.Request())
    latched_msg = node.vocabulary.snapshot()[-1]
    assert resp.vocabulary.revision == latched_msg.revision
    assert [c.name for c in resp.vocabulary.classes] == [c.name for c in latched_msg.classes]


def test_query_on_latest_frame_and_on_given_image(node: Node) -> None:
    labels, _ = node.roundtrip()
    resp = node.client.call(Query, node.srv("query"), Query.Request(texts=["a red chair", "the floor"]))
    assert resp.success, resp.message
    assert len(resp.masks) == len(resp.scores) == 2
    for m in resp.masks:
        assert m.encoding == "mono8" and (m.width, m.height) == (64, 48)
        assert set(np.unique(image_array(m)).tolist()) <= {0, 255}
    assert all(0.0 <= s <= 1.0 for s in resp.scores)
    # the latest frame is the last one published; it has the same frame_id and a stamp we sent
    assert resp.header.frame_id == "test_camera"

    given = make_image(32, 24, "bgr8", frame_id="query_cam")
    resp = node.client.call(Query, node.srv("query"), Query.Request(texts=["a door"], image=given))
    assert resp.success, resp.message
    assert same_header(resp.header, given.header)
    assert (resp.masks[0].width, resp.masks[0].height) == (32, 24)

    bad = make_image(32, 24, "rgb8")
    bad.encoding = "yuv422"
    resp = node.client.call(Query, node.srv("query"), Query.Request(texts=["a door"], image=bad))
    assert not resp.success and "unsupported encoding" in resp.message
    resp = node.client.call(Query, node.srv("query"), Query.Request(texts=[]))
    assert not resp.success and "no texts" in resp.message


def test_diagnostics(node: Node) -> None:
    node.roundtrip()
    kv = node.diag_values(lambda kv: int(kv.get("frames_processed", "0")) > 0)
    for key in ("latency_ms_mean", "processed_fps", "dropped_fps", "frames_dropped", "frames_refused",
                "last_refusal_reason", "device", "vocabulary_revision"):
        assert key in kv, key
    assert kv["device"] == "cpu" and kv["state"] == "active"


# --- vocabulary changes ----------------------------------------------------------------------------------
def test_set_vocabulary_revision_flows_into_every_output(node: Node) -> None:
    before = node.revision()
    resp = node.set_vocabulary(["wall", "table, desk", "cat"], ["a vertical surface", "", ""], [False, True, True])
    assert resp.success, resp.message
    assert resp.revision == before + 1
    vocab = node.vocabulary.wait_for(lambda m: m.revision == resp.revision)
    assert vocab is not None and [c.name for c in vocab.classes] == ["wall", "table", "cat"]
    ids = list(resp.class_ids)  # stable ids: new names take free ids, not positions
    assert ids == [c.id for c in vocab.classes] and len(set(ids)) == 3 and max(ids) < 255
    assert vocab.classes[0].description == "a vertical surface" and not vocab.classes[0].is_thing
    hit, _ = publish_until(node.image_pub, lambda i: make_image(), node.info,
                           lambda m, sent: m.vocabulary_revision == resp.revision, timeout=30)
    assert hit is not None
    key = stamp_of(hit.header)
    pan = node.panoptic.wait_for(lambda m: stamp_of(m.header) == key)
    lab = node.labels.wait_for(lambda m: stamp_of(m.header) == key)
    assert pan.vocabulary_revision == resp.revision
    assert set(np.unique(image_array(lab)).tolist()) <= set(ids) | {255}
    assert all(s.class_id in ids and s.class_name == vocab.classes[ids.index(s.class_id)].name
               for s in pan.segments)
    # no output mixes vocabularies: per frame, info and panoptic agree
    pans = {stamp_of(m.header): m.vocabulary_revision for m in node.panoptic.snapshot()}
    for info in node.info.snapshot():
        if stamp_of(info.header) in pans:
            assert pans[stamp_of(info.header)] == info.vocabulary_revision


def test_more_than_255_classes_switch_labels_to_mono16(node: Node) -> None:
    names = [f"object {i}" for i in range(300)]
    resp = node.set_vocabulary(names)
    assert resp.success, resp.message
    vocab = node.vocabulary.wait_for(lambda m: m.revision == resp.revision)
    assert vocab.label_encoding == "mono16" and vocab.unlabeled_id == 65535 and len(vocab.classes) == 300
    hit, _ = publish_until(node.image_pub, lambda i: make_image(), node.info,
                           lambda m, sent: m.vocabulary_revision == resp.revision, timeout=30)
    assert hit is not None
    lab = node.labels.wait_for(lambda m: stamp_of(m.header) == stamp_of(hit.header))
    assert lab.encoding == "mono16" and (lab.width, lab.height) == (64, 48)
    values = set(np.unique(image_array(lab)).tolist())
    assert values <= {c.id for c in vocab.classes} | {65535}
    assert node.set_vocabulary(SMALL).success


@pytest.mark.parametrize(
    "classes,descriptions,is_thing,expected",
    [
        ([], [], [], "the vocabulary is empty"),
        (["chair", ""], [], [], "the name is empty"),
        (["chair", " , seat"], [], [], "the name is empty"),
        (["chair", "table", "Chair"], [], [], "duplicate class name 'Chair'"),
        (["chair", "word " * 120], [], [], "tokens long"),
        (["chair", "table"], ["one"], [], "descriptions has 1 values for 2 classes"),
        (["chair", "table"], [], [True], "is_thing has 1 values for 2 classes"),
    ],
    ids=["empty", "empty-name", "empty-name-with-synonym", "duplicate", "longer-than-context",
         "descriptions-length", "is-thing-length"],
)
def test_refused_vocabulary_changes_nothing(node: Node, classes: list, descriptions: list, is_thing: list,
                                            expected: str) -> None:
    before = node.revision()
    resp = node.set_vocabulary(classes, descriptions, is_thing)
    assert not resp.success
    assert expected in resp.message, resp.message
    assert resp.revision == before and node.revision() == before
    node.assert_still_serving()


def test_refused_more_than_65534_classes(node: Node) -> None:
    before = node.revision()
    resp = node.set_vocabulary([f"c{i}" for i in range(65535)])
    assert not resp.success and "65535 classes requested; at most 65534" in resp.message
    assert node.revision() == before
    node.assert_still_serving()


# --- bad input images --------------------------------------------------------------------------------------
def _refused(node: Node, make_bad: Any, expected: str) -> None:
    before = int(node.diag_values().get("frames_refused", "0"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        node.image_pub.publish(make_bad())
        kv = node.diag_values(timeout=2.0)
        if int(kv["frames_refused"]) > before and expected in kv["last_refusal_reason"]:
            break
    else:
        pytest.fail(f"refusal {expected!r} not reported; node log:\n{node.proc.output()[-2000:]}")
    assert "frame refused: " in node.proc.output()  # logged (throttled)
    node.assert_still_serving()


def test_refuses_unsupported_encoding(node: Node) -> None:
    def bad() -> Image:
        msg = make_image()
        msg.encoding = "yuv422"
        return msg

    _refused(node, bad, "unsupported encoding 'yuv422'")


def test_refuses_encoding_that_lies(node: Node) -> None:
    _refused(node, lambda: make_image(64, 48, "rgb8", data=bytes(64 * 48), step=64), "smaller than width")


def test_refuses_data_shorter_than_step_times_height(node: Node) -> None:
    _refused(node, lambda: make_image(64, 48, "rgb8", data=bytes(64 * 3 * 47), step=64 * 3), "shorter than step*height")


def test_refuses_zero_size_image(node: Node) -> None:
    _refused(node, lambda: make_image(0, 0, "rgb8", data=b"", step=0), "zero-size image")


def test_refuses_image_above_max_image_pixels(node: Node) -> None:
    _refused(node, lambda: make_image(500, 300, "mono8"), "above max_image_pixels=100000")


def test_accepts_big_endian_mono16(node: Node) -> None:
    labels, sent = node.roundtrip(lambda i: make_image(40, 30, "mono16", is_bigendian=True))
    assert (labels.width, labels.height) == (40, 30)


# --- lifecycle (last: it toggles the shared node) ------------------------------------------------------------
def test_deactivate_stops_outputs_and_activate_resumes(node: Node) -> None:
    c = node.client
    assert c.change_state(node.fqn, "deactivate")
    assert c.lifecycle_state(node.fqn) == "inactive"
    time.sleep(0.5)  # let an in-flight frame drain
    node.labels.clear()
    for _ in range(10):
        node.image_pub.publish(make_image())
        time.sleep(0.1)
    assert node.labels.wait_for(timeout=1.5) is None, "outputs while inactive"
    # services still answer while inactive
    assert node.revision() >= 1
    assert c.change_state(node.fqn, "activate")
    assert c.lifecycle_state(node.fqn) == "active"
    node.roundtrip()


# --- network rule ---------------------------------------------------------------------------------------
def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def test_node_sockets_stay_on_loopback(node: Node) -> None:
    """With the test profile (config/fastdds_loopback.xml) every IP socket of the node is bound to 127.0.0.1."""
    if not Path("/proc/net/udp").exists():
        pytest.skip("needs Linux /proc")
    inodes = _socket_inodes(node.proc.pid)
    bound = []
    for table in ("udp", "udp6", "tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes:
                bound.append((table, cols[1]))
    assert bound, "the node has no IP sockets?"
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    outside = [(t, a) for t, a in bound if a.split(":")[0] not in loopback]
    assert not outside, f"sockets not on loopback: {outside}"
