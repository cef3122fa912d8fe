"""Persistent track ids and the temporal filter on the real node over loopback DDS (in-process), with the
model-free ``color_key`` segmenter on the synthetic video of :mod:`ovseg_ros.eval.video_synth` (exact truth):

* a stream of the sequence: every ground-truth object keeps one track id while it stays in view;
* a vocabulary change and a deactivate/activate start new ids (never a reused one), and /diagnostics says why;
* ``temporal_filter`` is ``none`` by default, and then the labels are exactly the segmenter's.
"""

from __future__ import annotations

import array
import json
import time
from typing import Any, Iterator

import numpy as np
import pytest
from ros_harness import (
    RosClient,
    active_inprocess_node,
    image_array,
    require_ros_or_skip,
    stamp_of,
    wait_for_diagnostic,
)

require_ros_or_skip()

from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from ovseg_ros.eval.video_synth import CLASSES, SceneConfig, color_key_options, generate  # noqa: E402
from ovseg_ros.msg import PanopticSegmentation  # noqa: E402
from ovseg_ros.srv import SetVocabulary  # noqa: E402

OK = TransitionCallbackReturn.SUCCESS
SCENE = SceneConfig(width=160, height=120, frames=40, objects=4, seed=3, speed=0.01)


@pytest.fixture(scope="module")
def node(ros_session: None, namespace: str) -> Iterator[Any]:
    params = {"segmenter": "color_key", "cache_dir": "", "vocabulary": list(CLASSES),
              "segmenter_options": json.dumps(color_key_options()), "diagnostics_period": 0.2,
              "panoptic_min_area": 16, "image_reliability": "reliable", "image_queue_depth": 10}
    with active_inprocess_node(namespace, params) as n:
        yield n


_BASE_S = [1000]  # each stream's stamps start later than the previous stream's (no jump back unless asked)


def _msg(frame: Any, base_s: int, frame_id: str = "cam") -> Image:
    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(frame.stamp_ns) + base_s * 10**9, 10**9)
    msg.header.frame_id = frame_id
    h, w = frame.image.shape[:2]
    msg.height, msg.width, msg.encoding, msg.step = h, w, "rgb8", w * 3
    msg.data = array.array("B", frame.image.tobytes())
    return msg


def _stream(client: RosClient, node: Any, frames: list, panoptic: Any, base_s: int = 0) -> list[tuple]:
    """Publish each frame and wait for its panoptic output (one at a time: none is dropped); (frame, panoptic,
    stamp) triples. Stamps: the frame's plus ``base_s`` (default: later than every earlier stream)."""
    if not base_s:
        _BASE_S[0] += 100
        base_s = _BASE_S[0]
    ns = node.get_namespace()
    pub = client.publisher(f"{ns}/image", Image)
    got = []
    for f in frames:
        msg = _msg(f, base_s)
        deadline = time.monotonic() + 10.0
        out = None
        while out is None and time.monotonic() < deadline:
            pub.publish(msg)
            out = panoptic.wait_for(lambda m, s=stamp_of(msg.header): stamp_of(m.header) == s, timeout=1.0)
        assert out is not None, f"no panoptic output for frame {f.index}"
        got.append((f, out, stamp_of(msg.header)))
    return got


def _object_tracks(pairs: list[tuple], min_area: int = 16) -> dict[int, list[int]]:
    """Ground-truth object -> the track id of the published segment covering most of it, per frame."""
    tracks: dict[int, list[int]] = {}
    for f, msg, _ in pairs:
        ids = image_array(msg.segment_ids)
        by_seg = {s.id: s.track_id for s in msg.segments if s.is_thing}
        for obj in np.unique(f.instances):
            m = f.instances == obj
            if obj == 0 or m.sum() < 4 * min_area:
                continue
            vals, counts = np.unique(ids[m], return_counts=True)
            tracks.setdefault(int(obj), []).append(by_seg.get(int(vals[np.argmax(counts)]), 0))
    return tracks


@pytest.fixture(scope="module")
def panoptic(node: Any, client: RosClient) -> Any:
    return client.subscribe(f"{node.get_fully_qualified_name()}/panoptic", PanopticSegmentation)


def _segments_and_tracks(pairs: list[tuple]) -> set[int]:
    return {s.track_id for _, m, _ in pairs for s in m.segments if s.is_thing}


def test_ids_persist_across_the_stream(node: Any, client: RosClient, panoptic: Any) -> None:
    frames = list(generate(SCENE))
    pairs = _stream(client, node, frames, panoptic)
    tracks = _object_tracks(pairs)
    assert len(tracks) >= 3, tracks
    for obj, ids in tracks.items():
        assert 0 not in ids, f"object {obj}: untracked in some frame: {ids}"
        assert len(set(ids)) == 1, f"object {obj} changed its track id: {ids}"
    assert len({ids[0] for ids in tracks.values()}) == len(tracks), "two objects share a track id"
    for _, m, _ in pairs:
        for s in m.segments:
            assert (s.track_id == 0) == (not s.is_thing), "stuff is untracked, every thing is tracked"


def test_vocabulary_change_and_deactivate_start_new_ids(node: Any, client: RosClient, panoptic: Any) -> None:
    frames = list(generate(SCENE))[:6]
    before = _segments_and_tracks(_stream(client, node, frames, panoptic))
    assert before and 0 not in before
    resets = int(node.cameras[0].video.tracker.stats.resets["vocabulary"])
    # the same classes again: a new revision, hence new ids
    req = SetVocabulary.Request()
    req.classes = list(CLASSES)
    res = client.call(SetVocabulary, f"{node.get_fully_qualified_name()}/set_vocabulary", req, timeout=30.0)
    assert res.success, res.message
    later = list(generate(SCENE))[6:12]
    after = _segments_and_tracks(_stream(client, node, later, panoptic))
    assert after and not (after & before) and min(after) > max(before), (before, after)
    wait_for_diagnostic(client, node, "track_resets_vocabulary", str(resets + 1))
    # deactivate + activate: new ids again; an earlier stamp after that is not a clock jump (state was reset)
    assert node.trigger_deactivate() == OK
    wait_for_diagnostic(client, node, "track_resets_deactivate", "1")
    assert node.trigger_activate() == OK
    again = _segments_and_tracks(_stream(client, node, later[:3], panoptic))
    assert again and not (again & after) and min(again) > max(after)
    assert node.cameras[0].video.tracker.stats.resets["time_jump_back"] == 0


def test_stamp_going_back_resets(node: Any, client: RosClient, panoptic: Any) -> None:
    frames = list(generate(SCENE))
    first = _segments_and_tracks(_stream(client, node, frames[20:24], panoptic))
    jumps = node.cameras[0].video.tracker.stats.resets["time_jump_back"]
    back = _segments_and_tracks(_stream(client, node, frames[10:12], panoptic, base_s=_BASE_S[0]))  # earlier
    assert not (back & first)
    assert node.cameras[0].video.tracker.stats.resets["time_jump_back"] == jumps + 1


def _flip_frames() -> list:
    """A still scene with a block whose colour sits at the border of the chair's key colour (``max_distance``):
    on frame 3 it moves 8 grey levels out (below ``temporal_image_threshold``), so the segmenter's label there
    flips from chair to unlabeled for one frame while the image barely changes - a segmenter changing its mind."""
    still = SceneConfig(width=160, height=120, frames=6, objects=4, seed=3, speed=0.0, pixel_sigma=0.0)
    frames = list(generate(still))
    for k, f in enumerate(frames):
        f.image[0:6, 0:12] = (184 if k == 3 else 192, 40, 40)
    return frames


def _published_labels(client: RosClient, node: Any, panoptic: Any, frames: list) -> list[np.ndarray]:
    labels = client.subscribe(f"{node.get_fully_qualified_name()}/semantic/labels", Image)
    try:
        outs = []
        for _, _, stamp in _stream(client, node, frames, panoptic):
            out = labels.wait_for(lambda m, s=stamp: stamp_of(m.header) == s, timeout=5.0)
            assert out is not None
            outs.append(image_array(out))
        return outs
    finally:
        client.unsubscribe(labels)


def test_filter_off_by_default_changes_nothing(node: Any, client: RosClient, panoptic: Any) -> None:
    """Default ``temporal_filter`` is none: the published labels are the segmenter's, the flip included."""
    from ovseg_ros.core.segmenter import build_segmenter
    from ovseg_ros.eval.video_synth import vocabulary

    assert node.get_parameter("temporal_filter").value == "none"
    seg = build_segmenter("color_key", "realtime", color_key_options())
    state = seg.encode_vocabulary(vocabulary())
    frames = _flip_frames()
    outs = _published_labels(client, node, panoptic, frames)
    for f, out in zip(frames, outs):
        assert np.array_equal(out, seg.segment(f.image, state).labels.astype(np.uint8))
    assert (outs[2][0:6, 0:12] == 2).all() and (outs[3][0:6, 0:12] == 255).all()


def test_filter_vote_outvotes_a_one_frame_flip(node: Any, client: RosClient, panoptic: Any) -> None:
    """temporal_filter=vote (a live parameter): the one-frame flip is not published; off again, it is."""
    node.set_parameters([Parameter("temporal_filter", value="vote")])
    try:
        outs = _published_labels(client, node, panoptic, _flip_frames())
        for a in outs[1:]:
            assert np.array_equal(a, outs[0]), "a still scene must publish still labels"
        assert (outs[3][0:6, 0:12] == 2).all()
    finally:
        node.set_parameters([Parameter("temporal_filter", value="none")])
