"""The approximate-time matcher of frames with depth images (ovseg_ros.ros.sync): jitter, drops,
out-of-order arrival, late depth, bounded buffers. Pure Python (no ROS graph)."""

from __future__ import annotations

import random

import pytest

from ovseg_ros.ros.sync import ApproximateTimeMatcher

MS = 1_000_000
PERIOD = 33 * MS


def test_exact_and_jittered_stamps_pair_with_the_nearest() -> None:
    m = ApproximateTimeMatcher(slop_ns=20 * MS, depth_capacity=64)
    rng = random.Random(0)
    for i in range(50):
        m.push_depth(i * PERIOD + rng.randint(-8, 8) * MS, f"d{i}", now=i)
    pairs = []
    for i in range(50):
        pairs += m.push_frame(i * PERIOD, f"f{i}", now=i)
    assert pairs == [(f"f{i}", f"d{i}") for i in range(50)]
    st = m.stats()
    assert (st.matched, st.unmatched) == (50, 0)
    assert m.buffered <= m.depth_capacity


def test_outside_slop_is_unmatched_and_counted() -> None:
    m = ApproximateTimeMatcher(slop_ns=10 * MS)
    m.push_depth(100 * MS, "d", now=0)
    assert m.push_frame(140 * MS, "f", now=0) == []  # a depth image at 140 ms may still come
    assert m.poll(now=1.0) == [("f", None)]
    assert m.stats().unmatched == 1
    m.push_depth(200 * MS, "d2", now=1.0)
    assert m.push_frame(170 * MS, "g", now=1.0) == [("g", None)]  # decided at once: newer depth buffered


def test_dropped_depth_leaves_its_frame_unmatched_only() -> None:
    m = ApproximateTimeMatcher(slop_ns=10 * MS)
    for i in range(10):
        if i not in (3, 7):
            m.push_depth(i * PERIOD, i, now=0)
    out = []
    for i in range(10):
        out += m.push_frame(i * PERIOD, i, now=0)
    assert dict(out) == {i: (None if i in (3, 7) else i) for i in range(10)}
    assert (m.stats().matched, m.stats().unmatched) == (8, 2)


def test_out_of_order_depth_is_sorted() -> None:
    m = ApproximateTimeMatcher(slop_ns=10 * MS)
    order = [4, 0, 2, 1, 3, 6, 5]
    for i in order:
        m.push_depth(i * PERIOD, i, now=0)
    out = []
    for i in range(7):
        out += m.push_frame(i * PERIOD + 2 * MS, i, now=0)
    out += m.flush()  # the last frame waited for a depth image after it
    assert out == [(i, i) for i in range(7)]


def test_late_depth_resolves_a_waiting_frame() -> None:
    """The frame is processed before its depth image arrives (a fast segmenter): it waits, then pairs."""
    m = ApproximateTimeMatcher(slop_ns=20 * MS, max_wait_s=0.5)
    m.push_depth(0, "d0", now=0.0)
    assert m.push_frame(PERIOD, "f1", now=0.01) == []  # d0 is 33 ms away; a nearer one may come
    assert m.pending == 1
    assert m.push_depth(PERIOD + 3 * MS, "d1", now=0.02) == [("f1", "d1")]
    assert m.pending == 0


def test_waiting_frame_takes_the_best_candidate_when_the_wait_expires() -> None:
    m = ApproximateTimeMatcher(slop_ns=20 * MS, max_wait_s=0.2)
    m.push_depth(100 * MS, "d", now=0.0)
    assert m.push_frame(110 * MS, "f", now=0.0) == []
    assert m.poll(now=0.1) == []
    assert m.poll(now=0.25) == [("f", "d")]  # within slop; the depth stream stopped


def test_waiting_frame_without_candidate_expires_unmatched() -> None:
    m = ApproximateTimeMatcher(slop_ns=20 * MS, max_wait_s=0.2)
    assert m.push_frame(0, "f", now=0.0) == []
    assert m.poll(now=0.3) == [("f", None)]
    assert m.stats().unmatched == 1


def test_a_newer_depth_beyond_the_window_decides_at_once() -> None:
    m = ApproximateTimeMatcher(slop_ns=10 * MS)
    m.push_frame(0, "f", now=0.0)
    assert m.push_depth(100 * MS, "late", now=0.0) == [("f", None)]


def test_buffers_are_bounded() -> None:
    m = ApproximateTimeMatcher(slop_ns=5 * MS, depth_capacity=8, pending_capacity=3, max_wait_s=100.0)
    for i in range(1000):
        m.push_depth(i * PERIOD, i, now=0)
    assert m.buffered == 8
    assert m.stats().depth_unused == 992
    resolved = []
    for i in range(10):  # frames far in the future: every one waits for a depth that never comes
        resolved += m.push_frame((2000 + i) * PERIOD, i, now=0)
    assert m.pending == 3 and len(resolved) == 7 and m.stats().pending_overflow == 7
    assert all(d is None for _, d in resolved)
    assert len(m.flush()) == 3 and m.pending == 0


def test_one_depth_serves_a_faster_colour_stream() -> None:
    m = ApproximateTimeMatcher(slop_ns=20 * MS)
    m.push_depth(0, "d0", now=0)
    m.push_depth(66 * MS, "d1", now=0)
    out = []
    for i, t in enumerate([0, 10, 33, 56, 66]):
        out += m.push_frame(t * MS, i, now=0)
    assert out == [(0, "d0"), (1, "d0"), (2, None), (3, "d1"), (4, "d1")]


def test_randomised_stream_pairs_like_an_offline_nearest_search() -> None:
    rng = random.Random(1)
    slop = 15 * MS
    depth_stamps = [i * PERIOD + rng.randint(-10, 10) * MS for i in range(200) if rng.random() > 0.1]
    arrivals = depth_stamps[:]
    for i in range(0, len(arrivals) - 1, 5):  # some swapped neighbours (not across a dropped image)
        if arrivals[i + 1] - arrivals[i] < 1.5 * PERIOD:
            arrivals[i], arrivals[i + 1] = arrivals[i + 1], arrivals[i]
    m = ApproximateTimeMatcher(slop_ns=slop, depth_capacity=16)
    got = {}
    di = 0
    for i in range(200):
        frame = i * PERIOD
        while di < len(arrivals) and arrivals[di] <= frame + 2 * PERIOD:  # depth runs ahead of inference
            for f, d in m.push_depth(arrivals[di], arrivals[di], now=0):
                got[f] = d
            di += 1
        for f, d in m.push_frame(frame, frame, now=0):
            got[f] = d
    for f, d in m.flush():
        got[f] = d
    for i in range(200):
        frame = i * PERIOD
        best = min(depth_stamps, key=lambda s: abs(s - frame))
        assert got[frame] == (best if abs(best - frame) <= slop else None), i


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ApproximateTimeMatcher(slop_ns=-1)
    with pytest.raises(ValueError):
        ApproximateTimeMatcher(slop_ns=1, depth_capacity=0)


def test_peek_reads_the_nearest_within_slop_and_takes_nothing() -> None:
    m = ApproximateTimeMatcher(slop_ns=10 * MS)
    assert m.peek(100 * MS) is None
    m.push_depth(95 * MS, "a", now=0)
    m.push_depth(103 * MS, "b", now=0)
    assert m.peek(100 * MS) == "b" and m.peek(96 * MS) == "a"
    assert m.peek(120 * MS) is None  # nearest is 17 ms away
    st = m.stats()
    assert (st.matched, st.unmatched, m.buffered, m.pending) == (0, 0, 2, 0)
    assert m.push_frame(100 * MS, "f", now=0) == [("f", "b")]  # the frame's own match is unaffected
