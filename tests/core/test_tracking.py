"""The instance tracker, the temporal label vote, the synthetic video and the tracking metrics (ROS-free)."""

from __future__ import annotations

import numpy as np
import pytest

from ovseg_ros.core.postprocess import panoptic_from_semantic
from ovseg_ros.core.segmenter import PanopticResult, Segment
from ovseg_ros.core.temporal import FilterConfig, LabelFilter
from ovseg_ros.core.tracking import InstanceTracker, TrackerConfig, segment_centroids
from ovseg_ros.core.vocabulary import Vocabulary
from ovseg_ros.eval.tracking import FlickerAccumulator, TrackingAccumulator, evaluate_synthetic
from ovseg_ros.eval.video_synth import SceneConfig, generate

MS = 1_000_000
VOCAB = Vocabulary.from_request(["floor", "chair", "person"], is_thing=[False, True, True])


def frame(boxes: list[tuple[int, int, int, int, int]], h: int = 60, w: int = 80) -> PanopticResult:
    """Labels with (class, x, y, w, h) boxes on floor -> the panoptic result the node derives."""
    labels = np.zeros((h, w), np.int32)
    for c, x, y, bw, bh in boxes:
        labels[max(y, 0): y + bh, max(x, 0): x + bw] = c
    return panoptic_from_semantic(labels, np.ones((h, w), np.float32), VOCAB)


def ids_by_class_x(p: PanopticResult, ids: np.ndarray) -> dict[tuple[int, int], int]:
    return {(s.class_id, s.bbox[0]): int(t) for s, t in zip(p.segments, ids) if s.is_thing}


def test_ids_persist_while_objects_move_and_stuff_is_untracked() -> None:
    tr = InstanceTracker()
    seen: dict[int, set[int]] = {0: set(), 1: set()}
    for k in range(10):
        p = frame([(1, 5 + 2 * k, 10, 12, 12), (2, 60 - 2 * k, 30, 10, 14)])
        ids = tr.update(p, k * 33 * MS)
        for s, t in zip(p.segments, ids):
            if s.is_thing:
                seen[s.class_id - 1].add(int(t))
            else:
                assert t == 0
    assert seen == {0: {1}, 1: {2}}


def test_crossing_objects_of_different_classes_keep_their_ids() -> None:
    tr = InstanceTracker()
    got = []
    for k in range(12):  # chair moves right over the person's path, the person left; they overlap mid-way
        p = frame([(2, 50 - 3 * k, 20, 10, 14), (1, 10 + 3 * k, 22, 12, 12)])
        got.append({s.class_id: int(t) for s, t in zip(p.segments, tr.update(p, k * 33 * MS)) if s.is_thing})
    assert all(g == got[0] for g in got), got


def test_short_miss_keeps_the_id_long_one_does_not_in_stamp_time() -> None:
    tr = InstanceTracker(TrackerConfig(max_age_s=0.5))
    obj = [(1, 20, 20, 12, 12)]
    first = tr.update(frame(obj), 0)
    tr.update(frame(obj), 33 * MS)  # confirmed
    tr.update(frame([]), 66 * MS)  # missed / dropped
    assert tr.update(frame(obj), 400 * MS)[1] == first[1]
    tr.update(frame([]), 433 * MS)
    assert tr.update(frame(obj), 1_000 * MS)[1] != first[1]  # 0.6 s > max_age (stamp time, not wall time)


def test_max_age_zero_still_associates_consecutive_frames() -> None:
    tr = InstanceTracker(TrackerConfig(max_age_s=0.0))
    ids = {int(tr.update(frame([(1, 20 + k, 20, 12, 12)]), k * 33 * MS)[1]) for k in range(5)}
    assert len(ids) == 1
    tr.update(frame([]), 200 * MS)
    assert int(tr.update(frame([(1, 25, 20, 12, 12)]), 233 * MS)[1]) not in ids  # one frame unmatched: gone


def test_split_for_one_frame_keeps_the_old_id() -> None:
    tr = InstanceTracker()
    whole = [(1, 20, 20, 20, 12)]
    halves = [(1, 20, 20, 8, 12), (1, 32, 20, 8, 12)]
    a = tr.update(frame(whole), 0)[1]
    tr.update(frame(whole), 33 * MS)
    split = tr.update(frame(halves), 66 * MS)
    assert a in split.tolist()
    for k in range(3, 6):
        assert tr.update(frame(whole), k * 33 * MS)[1] == a


def test_reentry_through_the_same_edge_keeps_the_id() -> None:
    tr = InstanceTracker()
    ids = []
    xs = [10, 4, -2, -8, -20, -20, -8, -2, 4]  # leaves on the left, comes back there
    for k, x in enumerate(xs):
        p = frame([(1, x, 20, 14, 12)] if x > -14 else [])
        out = tr.update(p, k * 33 * MS)
        ids.extend(int(t) for s, t in zip(p.segments, out) if s.is_thing)
    assert len(set(ids)) == 1, ids


def test_resets_vocabulary_size_and_stamp_back_give_new_ids() -> None:
    tr = InstanceTracker()
    obj = [(1, 20, 20, 12, 12)]
    a = tr.update(frame(obj), 100 * MS, context=1)[1]
    b = tr.update(frame(obj), 133 * MS, context=2)[1]
    c = tr.update(frame(obj), 50 * MS, context=2)[1]
    d = tr.update(frame(obj, h=70), 80 * MS, context=2)[1]
    assert len({a, b, c, d}) == 4 and a < b < c < d  # never reused
    assert tr.stats.resets["vocabulary"] == 1
    assert tr.stats.resets["time_jump_back"] == 1
    assert tr.stats.resets["image_size"] == 1
    tr.reset("deactivate")
    assert tr.stats.resets["deactivate"] == 1 and tr.num_tracks == 0
    with pytest.raises(ValueError):
        tr.reset("whatever")


def test_centroid_gate_refuses_a_3d_jump() -> None:
    tr = InstanceTracker(TrackerConfig(max_speed_mps=1.0, centroid_slack_m=0.2))
    p = frame([(1, 20, 20, 12, 12)])
    a = tr.update(p, 0, centroids=np.array([[0.0, 0.0, 2.0], [0.0, 0.0, 2.0]]))
    near = tr.update(p, 33 * MS, centroids=np.array([[0.0, 0.0, 2.0], [0.0, 0.0, 2.05]]))
    assert near[1] == a[1]
    far = tr.update(p, 66 * MS, centroids=np.array([[0.0, 0.0, 2.0], [0.0, 0.0, 4.0]]))  # same pixels, 2 m away
    assert far[1] != a[1]
    with pytest.raises(ValueError):
        tr.update(p, 99 * MS, centroids=np.zeros((5, 3)))


def test_segment_centroids_ignore_nan() -> None:
    ids = np.zeros((8, 8), np.int32)
    ids[:4] = 1
    ids[4:] = 2
    xyz = np.zeros((8, 8, 3), np.float32)
    xyz[:4, :, 2] = 1.0
    xyz[4:, :, 2] = 3.0
    xyz[0, 0] = np.nan
    c = segment_centroids(ids, xyz, np.array([2, 1, 7]), stride=1)
    assert np.allclose(c[:2, 2], [3.0, 1.0]) and np.isnan(c[2]).all()


def test_tracker_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        TrackerConfig(max_age_s=float("nan"))
    with pytest.raises(ValueError):
        InstanceTracker().update(PanopticResult(np.zeros(5, np.int32), []), 0)


# --- temporal filter ---------------------------------------------------------------------------------------
def _still(n: int = 6) -> np.ndarray:
    img = np.zeros((20, 30, 3), np.uint8)
    img[:, 15:] = 200
    return img


def test_filter_none_returns_the_inputs_themselves() -> None:
    f = LabelFilter()
    labels, conf = np.zeros((4, 4), np.int32), np.ones((4, 4), np.float32)
    out = f.apply(labels, conf, np.zeros((4, 4, 3), np.uint8))
    assert out[0] is labels and out[1] is conf


def test_vote_removes_a_one_frame_flip_and_follows_a_lasting_change_after_frames_half() -> None:
    f = LabelFilter(FilterConfig("vote", frames=3))
    img = _still()
    base = np.zeros((20, 30), np.int32)
    conf = np.full((20, 30), 0.8, np.float32)
    flip = base.copy()
    flip[5:10, 5:10] = 1
    outs = [f.apply(x, conf, img, k)[0] for k, x in enumerate([base, base, flip, base, base])]
    assert all((o == 0).all() for o in outs)  # the flip of frame 2 never published
    # a lasting change on an unchanged image: followed after frames // 2 = 1 frame
    o1 = f.apply(flip, conf, img, 5)[0]
    o2 = f.apply(flip, conf, img, 6)[0]
    assert (o1[5:10, 5:10] == 0).all() and (o2[5:10, 5:10] == 1).all()


def test_vote_follows_at_once_where_the_image_changed() -> None:
    f = LabelFilter(FilterConfig("vote", frames=5))
    img = _still()
    base = np.zeros((20, 30), np.int32)
    conf = np.ones((20, 30), np.float32)
    for k in range(4):
        f.apply(base, conf, img, k)
    moved = img.copy()
    moved[2:8, 2:8] = 90  # an object came in
    lab = base.copy()
    lab[2:8, 2:8] = 2
    out, out_conf = f.apply(lab, conf * 0.5, moved, 5)
    assert (out[2:8, 2:8] == 2).all() and np.allclose(out_conf[2:8, 2:8], 0.5)
    assert (out[12:, 20:] == 0).all()


def test_vote_restarts_on_context_and_stamp_back() -> None:
    f = LabelFilter(FilterConfig("vote", frames=3))
    img = _still()
    a, b = np.zeros((20, 30), np.int32), np.ones((20, 30), np.int32)
    conf = np.ones((20, 30), np.float32)
    f.apply(a, conf, img, 10, context=1)
    f.apply(a, conf, img, 11, context=1)
    assert (f.apply(b, conf, img, 12, context=2)[0] == 1).all()  # new vocabulary: no vote from the old one
    assert (f.apply(a, conf, img, 5, context=2)[0] == 0).all()  # stamp went back: restart
    assert f.resets == 2
    with pytest.raises(ValueError):
        FilterConfig("median")
    with pytest.raises(ValueError):
        f.apply(a[:5], conf, img, 13, context=2)


# --- synthetic video and metrics ---------------------------------------------------------------------------
def test_synthetic_truth_is_what_color_key_sees() -> None:
    from ovseg_ros.core.segmenter import build_segmenter
    from ovseg_ros.eval.video_synth import color_key_options, vocabulary

    seg = build_segmenter("color_key", "realtime", color_key_options())
    state = seg.encode_vocabulary(vocabulary())
    frames = list(generate(SceneConfig(frames=30, pan=0.2, drop=0.3, seed=1)))
    assert 10 < len(frames) < 30  # some dropped
    assert all(b.stamp_ns > a.stamp_ns for a, b in zip(frames, frames[1:]))
    for f in frames:
        assert np.array_equal(seg.segment(f.image, state).labels, f.labels)
    noisy = list(generate(SceneConfig(frames=30, seed=1, border=0.5, miss=0.2, split=0.2)))
    assert any((f.noisy != f.labels).any() for f in noisy)
    assert all(np.array_equal(f.labels, g.labels) for f, g in zip(noisy, generate(SceneConfig(frames=30, seed=1))))


def test_metrics_count_a_swap_and_score_a_perfect_run() -> None:
    pytest.importorskip("trackeval")
    gt = np.zeros((10, 10), np.int32)
    gt[:, :5], gt[:, 5:] = 1, 2
    perfect, swapped = TrackingAccumulator(), TrackingAccumulator()
    for k in range(6):
        perfect.add(gt, gt, {1: 11, 2: 12})
        swapped.add(gt, gt, {1: 11, 2: 12} if k < 3 else {1: 12, 2: 11})
    p, s = perfect.metrics(), swapped.metrics()
    assert p["IDF1"] == pytest.approx(1.0) and p["HOTA"] == pytest.approx(1.0) and p["IDSW"] == 0
    assert s["IDSW"] == 2 and s["IDF1"] < 0.6
    fl = FlickerAccumulator()
    fl.add(gt, gt)
    flip = gt.copy()
    flip[0, 0] = 2
    fl.add(gt, flip)
    assert fl.metrics()["flicker"] == pytest.approx(1 / 100)


def test_noise_free_sequences_meet_the_targets() -> None:
    """IDF1 >= 0.95 and <= 1 identity switch per 100 object-frames on noise-free sequences (the issue's
    targets; the benchmark runs longer ones)."""
    pytest.importorskip("trackeval")
    for scene in (SceneConfig(frames=90, seed=0), SceneConfig(frames=90, seed=1, pan=0.3, drop=0.15)):
        m = evaluate_synthetic(scene)
        assert m["IDF1"] >= 0.95 and m["IDSW_per_100"] <= 1.0, (scene, m)


def test_predicted_instances_with_sparse_ids_are_tracked() -> None:
    """A method's own instances (FC-CLIP) may carry any ids, also overlapping objects of one class: the tracker
    takes the segments as given (no connected components)."""
    def predicted(x: int, ids: tuple[int, int]) -> PanopticResult:
        m = np.zeros((60, 80), np.int32)
        m[10:30, x: x + 15] = ids[0]
        m[10:30, x + 15: x + 30] = ids[1]  # two touching chairs: one component, two instances
        segs = [Segment(ids[0], 1, True, 0.9, 300, (x, 10, 15, 20)),
                Segment(ids[1], 1, True, 0.9, 300, (x + 15, 10, 15, 20))]
        return PanopticResult(m, segs)

    tr = InstanceTracker()
    first = tr.update(predicted(5, (7, 5_000_000)), 0)
    for k in range(1, 6):  # ids change every frame, as a per-frame model's do
        got = tr.update(predicted(5 + 2 * k, (100 + k, 9 + k)), k * 33 * MS)
        assert got.tolist() == first.tolist()


def _depth_cue(p: PanopticResult, z_by_class_x: dict[tuple[int, int], float], background: float = 8.0):
    """A metric depth image of ``p``'s objects (class, x0) at the given depths, and the cue the node builds."""
    from ovseg_ros.core.depth import Intrinsics
    from ovseg_ros.core.tracking import DepthCue

    h, w = p.segment_ids.shape
    metres = np.full((h, w), background, np.float32)
    for s in p.segments:
        z = z_by_class_x.get((s.class_id, s.bbox[0]))
        if z is not None:
            metres[p.segment_ids == s.id] = z
    metres[::7, ::5] = np.nan  # holes: invalid depth pixels are ignored
    return DepthCue(metres, Intrinsics(100.0, 100.0, (w - 1) / 2, (h - 1) / 2, w, h), 0.1, 10.0)


def test_depth_cue_tells_apart_what_masks_alone_merge() -> None:
    """A chair at 2 m is hidden for 4 frames; a different chair, 5 m away, then shows in the same place of the
    image. Masks alone give it the hidden chair's id (same pixels, lost track within max_age); the 3D centroid
    from the depth image gates the pair out and gives a new id. The positive control (the same chair coming
    back at 2 m) keeps its id with the cue."""
    from ovseg_ros.core.tracking import depth_centroids

    def run(use_depth: bool, back_at: float) -> tuple[int, int, set[int]]:
        tr = InstanceTracker()
        chair: dict[int, int] = {}
        person: set[int] = set()
        for k in range(11):
            boxes = [(2, 60, 30, 10, 14)]  # a person who stays in view at 3 m
            if k < 4 or k >= 8:
                boxes.append((1, 10 + k, 10, 14, 14))  # the chair moves 1 px a frame (hidden in frames 4-7)
            p = frame(boxes)
            depths = {(1, 10 + k): (2.0 if k < 4 else back_at), (2, 60): 3.0}
            cent = depth_centroids(p, _depth_cue(p, depths)) if use_depth else None
            ids = ids_by_class_x(p, tr.update(p, k * 33 * MS, centroids=cent))
            if (1, 10 + k) in ids:
                chair[k] = ids[(1, 10 + k)]
            person.add(ids[(2, 60)])
        return chair[0], chair[10], person

    first, last, _ = run(use_depth=False, back_at=5.0)
    assert last == first  # masks alone: the far chair takes the hidden chair's id (the error the cue fixes)
    first, last, person = run(use_depth=True, back_at=5.0)
    assert last != first and last != 0
    assert len(person) == 1  # the person at a steady depth keeps its id under the cue
    first, last, person = run(use_depth=True, back_at=2.0)
    assert last == first and len(person) == 1  # the same chair coming back where it was keeps its id


def test_depth_centroids_back_project_a_sample() -> None:
    from ovseg_ros.core.depth import DepthError, Intrinsics
    from ovseg_ros.core.tracking import DepthCue, depth_centroids

    p = frame([(1, 40, 10, 20, 20)], h=60, w=80)
    cue = _depth_cue(p, {(1, 40): 2.0})
    c = depth_centroids(p, cue)
    chair = [i for i, s in enumerate(p.segments) if s.is_thing][0]
    # pinhole: x = (u - cx) z / fx; the box spans u 40..59 -> mean u 49.5, v 10..29 -> 19.5; cx 39.5, cy 29.5
    assert np.allclose(c[chair], [(49.5 - 39.5) * 2.0 / 100.0, (19.5 - 29.5) * 2.0 / 100.0, 2.0], atol=0.03)
    floor = [i for i, s in enumerate(p.segments) if not s.is_thing][0]
    assert abs(c[floor, 2] - 8.0) < 1e-6
    # depth at half resolution with its own intrinsics: the same centroids
    half = DepthCue(cue.metres[::2, ::2].copy(), Intrinsics(50.0, 50.0, 19.75, 14.75, 40, 30), 0.1, 10.0)
    assert np.allclose(depth_centroids(p, half)[chair], c[chair], atol=0.05)
    # out of range: no valid point, NaN
    assert np.isnan(depth_centroids(p, DepthCue(cue.metres, cue.intrinsics, 0.1, 1.0))[chair]).all()
    with pytest.raises(DepthError):  # not this frame's depth: another aspect ratio
        depth_centroids(p, DepthCue(np.ones((60, 60), np.float32), cue.intrinsics))
