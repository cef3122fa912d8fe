"""The tracker's 3D centroid cue fed by the node (``publish_points: true``), over loopback DDS (in-process), with
the model-free ``color_key`` segmenter on the synthetic video of :mod:`ovseg_ros.eval.video_synth` and a depth
image rendered from its exact ground truth (each object at its own depth, registered to the colour image):

* with depth + camera_info on the wire before each colour frame, every frame is tracked with the cue
  (``track_depth_cue_frames`` in /diagnostics rises by one per frame) and every object keeps its track id;
* without depth for some frames, those are tracked on masks alone (the counter stays), the ids still persist;
* the cue reaches the tracker's gate: a chair hidden for a few frames, then a chair in the same place of the
  image but 3 m farther, gets a new id (masks alone would give the hidden one's); at the same depth, the old id.
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

from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from ovseg_ros.eval.video_synth import CLASSES, SceneConfig, color_key_options, generate  # noqa: E402
from ovseg_ros.msg import PanopticSegmentation  # noqa: E402

SCENE = SceneConfig(width=160, height=120, frames=30, objects=4, seed=3, speed=0.01)
BASE_S = 5000
_BASE = [BASE_S]


@pytest.fixture(scope="module")
def node(ros_session: None, namespace: str) -> Iterator[Any]:
    params = {"segmenter": "color_key", "cache_dir": "", "vocabulary": list(CLASSES),
              "segmenter_options": json.dumps(color_key_options()), "diagnostics_period": 0.2,
              "panoptic_min_area": 16, "image_reliability": "reliable", "image_queue_depth": 10,
              "publish_points": True, "depth_slop": 0.02}
    with active_inprocess_node(namespace, params) as n:
        yield n


def _header(msg: Any, stamp_ns: int) -> None:
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    msg.header.frame_id = "cam"


def _colour(frame: Any, stamp_ns: int) -> Image:
    msg = Image()
    _header(msg, stamp_ns)
    h, w = frame.image.shape[:2]
    msg.height, msg.width, msg.encoding, msg.step = h, w, "rgb8", w * 3
    msg.data = array.array("B", frame.image.tobytes())
    return msg


def _depth(frame: Any, stamp_ns: int) -> Image:
    """16UC1 millimetres: stuff at 6 m, object k at 1 + 0.5 k m (the scene's fixed depth order), or the frame's
    own ``depth_mm``."""
    mm = getattr(frame, "depth_mm", None)
    if mm is None:
        mm = np.full(frame.instances.shape, 6000, np.uint16)
        for k in np.unique(frame.instances):
            if k:
                mm[frame.instances == k] = 1000 + 500 * int(k)
    msg = Image()
    _header(msg, stamp_ns)
    h, w = mm.shape
    msg.height, msg.width, msg.encoding, msg.step = h, w, "16UC1", w * 2
    msg.data = array.array("B", mm.tobytes())
    return msg


def _info(stamp_ns: int) -> CameraInfo:
    msg = CameraInfo()
    _header(msg, stamp_ns)
    msg.width, msg.height = SCENE.width, SCENE.height
    msg.k = [120.0, 0.0, SCENE.width / 2, 0.0, 120.0, SCENE.height / 2, 0.0, 0.0, 1.0]
    return msg


def _wait(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def _stream(client: RosClient, node: Any, frames: list, with_depth: bool, base_s: int = BASE_S) -> list[tuple]:
    """Per frame: (with depth) depth + camera_info, waited for until the node buffered them, then the colour
    image, waited for its panoptic output. (frame, panoptic) pairs."""
    ns = node.get_namespace()
    colour = client.publisher(f"{ns}/image", Image)
    depth = client.publisher(f"{ns}/depth/image", Image)
    info = client.publisher(f"{ns}/depth/camera_info", CameraInfo)
    panoptic = client.subscribe(f"{node.get_fully_qualified_name()}/panoptic", PanopticSegmentation)
    points = node.cameras[0].points
    assert points is not None, "publish_points is on: the camera has its semantic cloud output"
    got = []
    try:
        for f in frames:
            stamp = base_s * 10**9 + int(f.stamp_ns)
            if with_depth:
                received = int(points.diagnostics()["depth_received"])
                deadline = time.monotonic() + 10.0
                while time.monotonic() < deadline:  # discovery: publish until the node has it
                    info.publish(_info(stamp))
                    depth.publish(_depth(f, stamp))
                    if _wait(lambda: int(points.diagnostics()["depth_received"]) > received
                             and points.diagnostics()["camera_info"] != "missing", 1.0):
                        break
            msg = _colour(f, stamp)
            out = None
            deadline = time.monotonic() + 10.0
            while out is None and time.monotonic() < deadline:
                colour.publish(msg)
                out = panoptic.wait_for(lambda m, s=stamp_of(msg.header): stamp_of(m.header) == s, timeout=1.0)
            assert out is not None, f"no panoptic output for frame {f.index}"
            got.append((f, out))
    finally:
        client.unsubscribe(panoptic)
    return got


def _object_tracks(pairs: list[tuple], min_area: int = 16) -> dict[int, list[int]]:
    """Ground-truth object -> the track id of the published segment covering most of it, per frame."""
    tracks: dict[int, list[int]] = {}
    for f, msg in pairs:
        ids = image_array(msg.segment_ids)
        by_seg = {s.id: s.track_id for s in msg.segments if s.is_thing}
        for obj in np.unique(f.instances):
            m = f.instances == obj
            if obj == 0 or m.sum() < 4 * min_area:
                continue
            vals, counts = np.unique(ids[m], return_counts=True)
            tracks.setdefault(int(obj), []).append(by_seg.get(int(vals[np.argmax(counts)]), 0))
    return tracks


def test_depth_cue_counted_and_ids_persist(node: Any, client: RosClient) -> None:
    video = node.cameras[0].video
    frames = list(generate(SCENE))
    before = video.depth_cue_frames
    pairs = _stream(client, node, frames[:20], with_depth=True)
    assert video.depth_cue_frames == before + 20, "every frame whose depth was there had the cue"
    diag = wait_for_diagnostic(client, node, "track_depth_cue_frames", str(before + 20))
    assert diag["track_depth_cue_refused"] == "0" and diag["track_depth_cue_ms_mean"] != "", diag
    # then frames without depth: tracked on masks alone (not counted), the ids carry on
    pairs += _stream(client, node, frames[20:], with_depth=False)
    assert video.depth_cue_frames == before + 20
    assert int(wait_for_diagnostic(client, node, "track_depth_cue_frames", str(before + 20))["track_frames"]) >= 30
    tracks = _object_tracks(pairs)
    assert len(tracks) >= 3, tracks
    for obj, ids in tracks.items():
        assert 0 not in ids, f"object {obj}: untracked in some frame: {ids}"
        assert len(set(ids)) == 1, f"object {obj} changed its track id: {ids}"
    assert len({ids[0] for ids in tracks.values()}) == len(tracks), "two objects share a track id"


def _chair_frames(back_at_mm: int) -> list:
    """A still chair (key colour) on the floor at 2 m, hidden in frames 4-6, back in frames 7-8 at ``back_at_mm``."""
    from types import SimpleNamespace

    from ovseg_ros.eval.video_synth import COLORS

    floor, chair = (np.array([int(c[i:i + 2], 16) for i in (1, 3, 5)], np.uint8) for c in (COLORS[1], COLORS[2]))
    frames = []
    for k in range(9):
        image = np.empty((SCENE.height, SCENE.width, 3), np.uint8)
        image[:] = floor
        instances = np.zeros((SCENE.height, SCENE.width), np.int32)
        depth_mm = np.full(instances.shape, 6000, np.uint16)
        if not 4 <= k <= 6:
            image[40:80, 50:90] = chair
            instances[40:80, 50:90] = 1
            depth_mm[40:80, 50:90] = 2000 if k < 4 else back_at_mm
        frames.append(SimpleNamespace(index=k, stamp_ns=(k + 1) * 33_333_333, image=image, instances=instances,
                                      depth_mm=depth_mm))
    return frames


def _chair_ids(pairs: list[tuple]) -> list[int]:
    return [t for _, m in pairs for t in {s.track_id for s in m.segments if s.is_thing}]


@pytest.mark.parametrize("back_at_mm, with_depth, same", [(5000, True, False), (2000, True, True),
                                                            (5000, False, True)])  # masks alone: the error
def test_depth_cue_reaches_the_gate(node: Any, client: RosClient, back_at_mm: int, with_depth: bool,
                                    same: bool) -> None:
    _BASE[0] += 100  # far from every earlier stream: old tracks have expired
    ids = _chair_ids(_stream(client, node, _chair_frames(back_at_mm), with_depth=with_depth, base_s=_BASE[0]))
    assert len(ids) == 6 and 0 not in ids, ids  # frames 0-3 and 7-8, one chair each
    assert len(set(ids[:4])) == 1 and len(set(ids[4:])) == 1, ids
    assert (ids[4] == ids[0]) == same, f"back at {back_at_mm} mm: {ids}"
