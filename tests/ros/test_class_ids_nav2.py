"""Nav2's reading of masks across vocabulary swaps (issue 17, defect 5) and a respawn that keeps the vocabulary
(defect 6), against the real segment_node over loopback DDS.

The emulated layer is the one of test_nav2_layer.py (Nav2's QoS and names): best-effort masks, a latched label
map that replaces the id -> name map whenever it arrives, every mask read with the map current at its arrival,
ids absent from the map skipped. The node runs ``color_key``: stripe k of the image has the key colour of
position k, so the true class of a pixel is the k-th class of the revision that made the frame (its
SegmentationInfo says which).
"""

from __future__ import annotations

import array
import os
import signal
import threading
import time
from typing import Any, Iterator

import numpy as np
import pytest
from ros_harness import NodeProcess, RosClient, latched, require_ros_or_skip, stamp_of

require_ros_or_skip()

from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from ovseg_ros.msg import SegmentationInfo, Vocabulary  # noqa: E402
from ovseg_ros.ros.vocabulary_store import VocabularyStore  # noqa: E402
from ovseg_ros.srv import GetVocabulary, SetVocabulary  # noqa: E402

W, H = 64, 16
KEYS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
# Swapped every second: names move between positions, leave and come back, so position ids would rename pixels.
CYCLE = [["floor", "wall", "person"], ["wall", "person", "tree"], ["person", "door", "floor"],
         ["tree", "floor", "wall"]]


def params(cache_dir: str = "") -> dict[str, Any]:
    return {
        "segmenter": "color_key",
        "segmenter_options": "{colors: [" + ", ".join(f"'#{r:02x}{g:02x}{b:02x}'" for r, g, b in KEYS) + "]}",
        "vocabulary": CYCLE[0],
        "device": "cpu",
        "cache_dir": cache_dir,
        "publish_panoptic": False,
        "nav2_compatible": True,
        "diagnostics_period": 1.0,
    }


def frame(stamp: tuple[int, int]) -> Image:
    rgb = np.zeros((H, W, 3), np.uint8)
    for k, colour in enumerate(KEYS):  # stripes 0..2, the last quarter black (unlabeled)
        rgb[:, k * W // 4:(k + 1) * W // 4] = colour
    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    msg.header.frame_id = "camera"
    msg.height, msg.width, msg.encoding, msg.step = H, W, "rgb8", 3 * W
    msg.data = array.array("B", rgb.tobytes())
    return msg


def stripe_ids(mask: Image) -> list[int]:
    assert mask.encoding == "mono8"
    a = np.frombuffer(bytes(mask.data), np.uint8).reshape(H, mask.step)[:, :W]
    ids = [int(a[H // 2, (2 * k + 1) * W // 8]) for k in range(4)]
    assert ids[3] == 255, "the black stripe is unlabeled"
    return ids[:3]


def get_vocabulary(client: RosClient, fqn: str, timeout: float = 40.0) -> Any:
    """~/get_vocabulary, asked again until answered: right after a kill -9 the client may still send to the dead
    process's service until DDS notices it is gone (the request is then lost, not refused)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.call(GetVocabulary, f"{fqn}/get_vocabulary", GetVocabulary.Request(), 3).vocabulary
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


@pytest.fixture(scope="module")
def node(namespace: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = NodeProcess(namespace, params(), tmp_path_factory.mktemp("ids_node"))
    try:
        assert proc.wait_for_log("active:", timeout=90), proc.output()[-3000:]
        yield proc
    finally:
        proc.stop()


def test_swaps_every_second_never_show_a_pixel_under_a_wrong_name(node: NodeProcess, client: RosClient,
                                                                  namespace: str) -> None:
    fqn = node.fqn
    events: list[tuple[str, Any]] = []  # in the order the client's single executor thread handled them
    lock = threading.Lock()

    def record(kind: str) -> Any:
        def cb(msg: Any) -> None:
            with lock:
                events.append((kind, msg))
        return cb

    sensor = QoSProfile(depth=50, reliability=ReliabilityPolicy.BEST_EFFORT, history=HistoryPolicy.KEEP_LAST)
    subs = [client.node.create_subscription(Vocabulary, f"{fqn}/vocabulary", record("labels"), latched()),
            client.node.create_subscription(Image, f"{fqn}/semantic/labels", record("mask"), sensor),
            client.node.create_subscription(SegmentationInfo, f"{fqn}/info", record("info"),
                                            QoSProfile(depth=200))]
    pub = client.publisher(f"{namespace}/image", Image)
    stop = threading.Event()

    def camera() -> None:  # 30 Hz
        i = 0
        while not stop.is_set():
            i += 1
            pub.publish(frame((5_000_000 + i // 30, (i % 30) * 33_000_000)))
            time.sleep(1 / 30)

    cam = threading.Thread(target=camera, daemon=True)
    try:
        time.sleep(1.0)
        cam.start()
        responses = []
        for k in range(1, 9):
            time.sleep(1.0)
            req = SetVocabulary.Request()
            req.classes = CYCLE[k % len(CYCLE)]
            resp = client.call(SetVocabulary, f"{fqn}/set_vocabulary", req, timeout=30)
            assert resp.success, resp.message
            responses.append(resp)
        time.sleep(1.0)
    finally:
        stop.set()
        cam.join(2)
        time.sleep(0.5)
        for s in subs:
            client.node.destroy_subscription(s)
    with lock:
        log = list(events)

    vocabularies = {m.revision: m for kind, m in log if kind == "labels"}
    revision_of = {stamp_of(m.header): m.vocabulary_revision for kind, m in log if kind == "info"}
    revisions = sorted(vocabularies)
    assert len(revisions) >= 8, f"revisions seen: {revisions}"
    for resp in responses:  # set_vocabulary answers the ids that ~/vocabulary then lists
        assert list(resp.class_ids) == [c.id for c in vocabularies[resp.revision].classes]
    id_map = {r: {c.id: c.name for c in v.classes} for r, v in vocabularies.items()}

    current: dict[int, str] = {}
    current_rev = None
    frames = wrong = crossed = checked_neighbours = 0
    seen_revisions = set()
    for kind, msg in log:
        if kind == "labels":  # the layer rebuilds its map on every label message
            current, current_rev = id_map[msg.revision], msg.revision
            continue
        if kind != "mask" or not current:  # masks are dropped until a map has arrived
            continue
        rev = revision_of.get(stamp_of(msg.header))
        if rev is None or rev not in vocabularies:
            continue  # its info was lost (best effort) or its revision predates the subscription
        frames += 1
        seen_revisions.add(rev)
        truth = [c.name for c in vocabularies[rev].classes]  # position k -> name
        ids = stripe_ids(msg)
        assert set(ids) <= set(id_map[rev]), "a mask holds exactly ids of its own LabelInfo"
        crossed += rev != current_rev
        i = revisions.index(rev)
        maps = [current] + [id_map[r] for r in revisions[max(0, i - 1):i + 2]]  # at arrival, previous, next
        checked_neighbours += len(maps) - 1
        if any(m.get(ids[k], truth[k]) != truth[k] for m in maps for k in range(3)):
            wrong += 1
    assert frames >= 100 and len(seen_revisions) >= 7, (frames, seen_revisions)
    assert wrong == 0, f"{wrong} of {frames} frames mapped a pixel to a wrong name ({crossed} read across a swap)"
    print(f"{frames} frames over {len(seen_revisions)} revisions, {crossed} read with another revision's map, "
          f"{wrong} wrong")
    assert node.alive()


def test_respawn_keeps_the_vocabulary_and_never_repeats_a_revision(client: RosClient,
                                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    ns = f"/ovseg_ids_respawn_{os.getpid()}"
    cache = tmp_path_factory.mktemp("ids_cache")
    store = VocabularyStore(cache, f"{ns}/segment_node")
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(b'{"format": "ovseg_ros/runtime_vocabulary/1", "node": "' + ns.encode() + b'/segm')
    first = NodeProcess(ns, params(str(cache)), tmp_path_factory.mktemp("ids_first"))
    try:
        assert first.wait_for_log("active:", timeout=90), first.output()[-3000:]
        assert "persisted vocabulary" in first.output() and "ignored" in first.output()  # corrupt: a warning
        fqn = first.fqn
        before = client.call(GetVocabulary, f"{fqn}/get_vocabulary", GetVocabulary.Request(), 30).vocabulary
        assert [c.name for c in before.classes] == CYCLE[0]
        req = SetVocabulary.Request()
        req.classes = ["person, people", "door", "floor"]
        req.descriptions = ["", "a door", ""]
        resp = client.call(SetVocabulary, f"{fqn}/set_vocabulary", req, timeout=30)
        assert resp.success, resp.message
        assert list(resp.class_ids) == [2, 3, 0]  # person and floor keep their ids, door takes a free one
        revisions = {before.revision, resp.revision}
        os.kill(first.pid, signal.SIGKILL)  # a crash: no shutdown code runs
        first.proc.wait(10)
    finally:
        first.stop()
    second = NodeProcess(ns, params(str(cache)), tmp_path_factory.mktemp("ids_second"))
    try:
        assert second.wait_for_log("active:", timeout=90), second.output()[-3000:]
        assert "restored the runtime vocabulary" in second.output()
        after = get_vocabulary(client, fqn)
        assert [(c.id, c.name, list(c.synonyms), c.description) for c in after.classes] == [
            (2, "person", ["people"], ""), (3, "door", [], "a door"), (0, "floor", [], "")]
        assert after.revision > max(revisions), (after.revision, revisions)
        latched_msg = client.subscribe(f"{fqn}/vocabulary", Vocabulary, latched()).wait_for(timeout=10)
        assert latched_msg is not None and latched_msg.revision == after.revision
        # a change after the respawn continues the ids and the revisions
        req = SetVocabulary.Request()
        req.classes = ["floor", "wall"]
        resp = client.call(SetVocabulary, f"{fqn}/set_vocabulary", req, timeout=30)
        assert resp.success and list(resp.class_ids) == [0, 1] and resp.revision == after.revision + 1
    finally:
        second.stop()


def test_persist_vocabulary_false_uses_the_parameters_but_keeps_counting(client: RosClient,
                                                                         tmp_path_factory: pytest.TempPathFactory
                                                                         ) -> None:
    ns = f"/ovseg_ids_nopersist_{os.getpid()}"
    cache = tmp_path_factory.mktemp("ids_cache2")
    first = NodeProcess(ns, params(str(cache)), tmp_path_factory.mktemp("ids_np1"))
    try:
        assert first.wait_for_log("active:", timeout=90), first.output()[-3000:]
        req = SetVocabulary.Request()
        req.classes = ["door"]
        resp = client.call(SetVocabulary, f"{first.fqn}/set_vocabulary", req, timeout=30)
        assert resp.success
    finally:
        first.stop()
    second = NodeProcess(ns, dict(params(str(cache)), persist_vocabulary=False), tmp_path_factory.mktemp("ids_np2"))
    try:
        assert second.wait_for_log("active:", timeout=90), second.output()[-3000:]
        after = get_vocabulary(client, second.fqn)
        assert [c.name for c in after.classes] == CYCLE[0] and after.revision > resp.revision
    finally:
        second.stop()
