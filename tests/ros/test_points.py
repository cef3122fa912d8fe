"""SemanticPointsOutput in-process, callbacks called directly: the cloud of a known scene, and every bad depth
or camera_info input refused with its reason, counted, and followed by a good frame that still publishes."""

from __future__ import annotations


import array
import types
from typing import Any, Iterator

import numpy as np
import pytest
from ros_harness import require_ros_or_skip

require_ros_or_skip()

import rclpy  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from ovseg_ros.core import depth as dp  # noqa: E402
from ovseg_ros.ros import messages  # noqa: E402
from ovseg_ros.ros.gate import OutputGate  # noqa: E402
from ovseg_ros.ros.params import validate  # noqa: E402
from ovseg_ros.ros.points import PointsOptions, SemanticPointsOutput  # noqa: E402

H, W = 6, 8  # label image
FX = 40.0  # at the depth resolution (2x)


def header(sec: int, nsec: int = 0, frame: str = "cam_color_optical") -> Any:
    from std_msgs.msg import Header

    h = Header()
    h.stamp.sec, h.stamp.nanosec, h.frame_id = sec, nsec, frame
    return h


def depth_image(arr: np.ndarray, encoding: str, sec: int, nsec: int = 0) -> Image:
    msg = Image()
    msg.header = header(sec, nsec)
    msg.height, msg.width = arr.shape
    msg.encoding = encoding
    msg.step = arr.shape[1] * arr.dtype.itemsize
    buf = array.array("B")
    buf.frombytes(arr.tobytes())
    msg.data = buf
    return msg


def camera_info(width: int = 2 * W, height: int = 2 * H, fx: float = FX) -> CameraInfo:
    msg = CameraInfo()
    msg.header = header(0)
    msg.width, msg.height = width, height
    msg.k = [fx, 0.0, (width - 1) / 2, 0.0, fx, (height - 1) / 2, 0.0, 0.0, 1.0]
    msg.p = [fx, 0.0, (width - 1) / 2, 0.0, 0.0, fx, (height - 1) / 2, 0.0, 0.0, 0.0, 1.0, 0.0]
    msg.d = [0.0] * 5
    return msg


class Capture:
    def __init__(self) -> None:
        self.msgs: list[Any] = []
        self.topic_name = "/captured"

    def publish(self, msg: Any) -> None:
        self.msgs.append(msg)


@pytest.fixture()
def out(ros_session: None) -> Iterator[tuple[SemanticPointsOutput, Capture]]:
    node = rclpy.create_node("points_test")
    o = SemanticPointsOutput(node, options=PointsOptions(min_depth=0.2, max_depth=8.0, rgb=True, slop=0.02,
                                                         max_wait=0.0))
    real, cap = o._pub, Capture()
    o._pub = cap
    try:
        yield o, cap
    finally:
        o._pub = real
        o.destroy()
        o.destroy()  # idempotent
        node.destroy_node()


def frame_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = np.zeros((H, W), np.int32)
    labels[:, W // 2:] = 2
    labels[0, 0] = -1
    conf = np.full((H, W), 0.5, np.float32)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0] = 200
    return labels, conf, rgb


def cloud_fields(msg: Any) -> dict[str, np.ndarray]:
    rec = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height * msg.width, msg.point_step)
    out = {}
    for f in msg.fields:
        dtype = {7: np.float32, 4: np.uint16}[f.datatype]
        size = np.dtype(dtype).itemsize
        out[f.name] = rec[:, f.offset:f.offset + size].copy().view(dtype).reshape(msg.height, msg.width)
    return out


def good_roundtrip(o: SemanticPointsOutput, cap: Capture, sec: int) -> Any:
    mm = np.full((2 * H, 2 * W), 2000, np.uint16)
    o._on_depth(depth_image(mm, "16UC1", sec, 5_000_000))  # 5 ms jitter, within slop
    labels, conf, rgb = frame_arrays()
    n = len(cap.msgs)
    assert o.publish(header(sec), labels, conf, rgb, unlabeled_id=255) is True
    assert len(cap.msgs) == n + 1
    return cap.msgs[-1]


def test_known_scene(out: tuple[SemanticPointsOutput, Capture]) -> None:
    o, cap = out
    o._on_camera_info(camera_info())
    mm = np.full((2 * H, 2 * W), 2000, np.uint16)
    mm[:, :4] = 0  # no reading
    mm[:2, -2:] = 9000  # beyond max_depth (the 2x2 block behind label pixel (0, W-1))
    o._on_depth(depth_image(mm, "16UC1", 10, 3_000_000))
    labels, conf, rgb = frame_arrays()
    hdr = header(10)
    assert o.publish(hdr, labels, conf, rgb, unlabeled_id=255)
    msg = cap.msgs[-1]
    assert msg.header == hdr and (msg.height, msg.width) == (H, W)
    assert msg.row_step == msg.point_step * W and not msg.is_dense
    f = cloud_fields(msg)
    assert f["label"][0, 0] == 255 and (f["label"][:, W // 2:] == 2).all() and f["label"][1, 0] == 0
    np.testing.assert_allclose(f["confidence"], 0.5)
    assert (f["rgb"].view(np.uint32) == 200 << 16).all()
    intr = dp.Intrinsics(FX, FX, (2 * W - 1) / 2, (2 * H - 1) / 2, 2 * W, 2 * H).scaled(W, H)
    expected = dp.project(dp.resample_nearest(mm.astype(np.float32) / 1000, H, W), intr, 0.2, 8.0)
    for i, axis in enumerate("xyz"):
        np.testing.assert_allclose(f[axis], expected[..., i], rtol=1e-6)
    assert np.isnan(f["z"][:, :2]).all() and np.isnan(f["z"][0, -1])
    np.testing.assert_allclose(f["z"][1:, 2:], 2.0)
    d = o.diagnostics()
    assert d["points_published"] == "1" and d["points_matched"] == "1" and d["camera_info"] == "16x12 (P)"


def _bad_depth_cases() -> list[tuple[str, Any, str]]:
    ok = np.full((2 * H, 2 * W), 2000, np.uint16)
    short = depth_image(ok, "16UC1", 0)
    short.data = short.data[:-3]
    return [
        ("encoding", depth_image(ok.astype(np.uint8), "mono8", 0), "unsupported depth encoding 'mono8'"),
        ("rgb", depth_image(np.zeros((2 * H, 2 * W * 3), np.uint8), "rgb8", 0), "unsupported depth encoding"),
        ("short", short, "bytes but step*height"),
        ("zero", depth_image(np.zeros((0, 4), np.uint16), "16UC1", 0), "zero-size"),
        ("aspect", depth_image(np.full((2 * H, 4 * W), 2000, np.uint16), "16UC1", 0), "registered"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_bad_depth_refused_counted_and_serving(out: tuple[SemanticPointsOutput, Capture], case: int) -> None:
    o, cap = out
    o._on_camera_info(camera_info())
    name, msg, reason = _bad_depth_cases()[case]
    sec = 100 + case
    msg.header = header(sec)
    o._on_depth(msg)
    labels, conf, rgb = frame_arrays()
    assert o.publish(header(sec), labels, conf, rgb) is False, name
    d = o.diagnostics()
    assert d["depth_refused"] == "1" and reason in d["depth_last_refusal"], d
    assert cap.msgs == []
    good_roundtrip(o, cap, sec + 50)


def test_invalid_depth_values_are_nan_points_not_refusals(out: tuple[SemanticPointsOutput, Capture]) -> None:
    o, cap = out
    o._on_camera_info(camera_info())
    m = np.full((2 * H, 2 * W), 3.0, np.float32)
    m[0] = np.nan
    m[1] = -1.0
    m[2] = np.inf
    m[3] = 0.1  # below min_depth
    o._on_depth(depth_image(m, "32FC1", 20))
    labels, conf, rgb = frame_arrays()
    assert o.publish(header(20), labels, conf, rgb)
    z = cloud_fields(cap.msgs[-1])["z"]
    assert np.isnan(z[:2]).all() and np.isfinite(z[2:]).all() and (z[2:] == 3.0).all()
    assert o.diagnostics()["depth_refused"] == "0"


def test_missing_and_bad_camera_info(out: tuple[SemanticPointsOutput, Capture]) -> None:
    o, cap = out
    o._on_depth(depth_image(np.full((2 * H, 2 * W), 2000, np.uint16), "16UC1", 30))
    labels, conf, rgb = frame_arrays()
    assert o.publish(header(30), labels, conf, rgb) is False
    assert "no valid camera_info" in o.diagnostics()["depth_last_refusal"]
    o._on_camera_info(camera_info(fx=0.0))
    d = o.diagnostics()
    assert d["camera_info_refused"] == "1" and "focal" in d["depth_last_refusal"] and d["camera_info"] == "missing"
    o._on_camera_info(camera_info(width=4 * W))  # another aspect ratio than the labels
    o._on_depth(depth_image(np.full((2 * H, 2 * W), 2000, np.uint16), "16UC1", 31))
    assert o.publish(header(31), labels, conf, rgb) is False
    assert "camera_info is" in o.diagnostics()["depth_last_refusal"]
    o._on_camera_info(camera_info())
    good_roundtrip(o, cap, 32)


def test_garbage_never_raises(out: tuple[SemanticPointsOutput, Capture]) -> None:
    o, cap = out
    o._on_depth(types.SimpleNamespace())  # not an Image at all
    o._on_camera_info(types.SimpleNamespace(k=["x"] * 9, p=[], width=1, height=1, d=[]))
    labels, conf, _ = frame_arrays()
    assert o.publish(types.SimpleNamespace(), labels, conf) is False
    assert o.publish(header(40), labels, conf[:2]) in (True, False)  # shape mismatch: refused when paired
    d = o.diagnostics()
    assert int(d["points_errors"]) >= 2
    o._on_camera_info(camera_info())
    good_roundtrip(o, cap, 41)


def test_no_depth_within_slop_is_counted(out: tuple[SemanticPointsOutput, Capture]) -> None:
    o, cap = out
    o._on_camera_info(camera_info())
    o._on_depth(depth_image(np.full((2 * H, 2 * W), 2000, np.uint16), "16UC1", 50, 100_000_000))  # 100 ms late
    labels, conf, rgb = frame_arrays()
    assert o.publish(header(50), labels, conf, rgb) is False
    assert o.diagnostics()["points_unmatched"] == "1" and cap.msgs == []


def test_a_late_depth_image_publishes_only_a_still_current_frame_through_the_gate(ros_session: None) -> None:
    """A frame waits for its depth image; when it comes, the cloud goes out through the node's gate (under its
    lock) and only if the frame's binding is still the current one (else it is counted, not published)."""
    node = rclpy.create_node("points_test_late")
    gate = OutputGate()
    old, new = types.SimpleNamespace(generation=1), types.SimpleNamespace(generation=1)
    gate.install(old, None, lambda b, s: None)
    gate.open()
    o = SemanticPointsOutput(node, options=PointsOptions(slop=0.02, max_wait=5.0), gate=gate)
    real, cap = o._pub, Capture()
    o._pub = cap
    held: list[bool] = []
    cap_publish = cap.publish
    cap.publish = lambda msg: (held.append(gate.locked()), cap_publish(msg))  # type: ignore[method-assign]
    try:
        o._on_camera_info(camera_info())
        labels, conf, _ = frame_arrays()
        for sec in (60, 61):
            assert o.publish(header(sec), labels, conf, binding=old) is True  # pending
        assert cap.msgs == []
        o._on_depth(depth_image(np.full((2 * H, 2 * W), 2000, np.uint16), "16UC1", 60, 1_000_000))
        assert len(cap.msgs) == 1 and held == [True]
        assert gate.swap(old, lambda cur: new, None, lambda b, s: None) is new  # before frame 61's depth came
        o._on_depth(depth_image(np.full((2 * H, 2 * W), 2000, np.uint16), "16UC1", 61, 1_000_000))
        assert len(cap.msgs) == 1
        assert o.diagnostics()["points_stale_vocabulary"] == "1"
    finally:
        o._pub = real
        o.destroy()
        node.destroy_node()


def test_after_destroy_nothing_is_published(ros_session: None) -> None:
    node = rclpy.create_node("points_test_destroy")
    o = SemanticPointsOutput(node)
    o.destroy()
    labels, conf, _ = frame_arrays()
    assert o.publish(header(1), labels, conf) is False
    node.destroy_node()


# --- parameters and Nav2 mode --------------------------------------------------------------------------------
def test_nav2_mode_refuses_more_than_255_classes() -> None:
    assert messages.nav2_vocabulary_error(255, True) is None
    assert messages.nav2_vocabulary_error(300, False) is None
    reason = messages.nav2_vocabulary_error(256, True)
    assert reason and "256 classes" in reason and "one byte per pixel" in reason


def test_depth_parameters_are_validated() -> None:
    assert validate("min_depth", 5.0, {"min_depth": 5.0, "max_depth": 2.0})
    assert validate("max_depth", 20.0, {"min_depth": 0.1, "max_depth": 20.0}) is None
    assert "depth_slop must be in" in validate("depth_slop", -1.0, {})
    with pytest.raises(ValueError, match="min_depth"):
        PointsOptions(min_depth=3.0, max_depth=1.0)


def test_health_names_why_no_cloud_comes_out(out: tuple[SemanticPointsOutput, Capture]) -> None:
    o, cap = out
    assert o.health() is None  # nothing happened
    labels, conf, rgb = frame_arrays()
    o.publish(header(60), labels, conf, rgb)  # no depth at all (max_wait 0: resolved at once)
    assert "no depth image received" in o.health()  # the cause, not only "none within depth_slop"
    o._on_depth(depth_image(np.full((2 * H, 2 * W), 2000, np.uint16), "16UC1", 61))
    o.publish(header(61), labels, conf, rgb)  # paired, but no camera_info yet
    assert "camera_info" in o.health()
    o._on_camera_info(camera_info())
    good_roundtrip(o, cap, 62)
    assert o.health() is None


def test_depth_cue_for_the_tracker_reads_without_taking(out: tuple[SemanticPointsOutput, Capture]) -> None:
    """The tracker's cue: the buffered depth image within slop, metric, with the camera's intrinsics; None
    without camera_info or depth; reading it neither matches nor prunes (the frame's cloud still comes)."""
    o, cap = out
    assert o.depth_cue(header(70)) is None  # nothing yet
    o._on_depth(depth_image(np.full((2 * H, 2 * W), 2500, np.uint16), "16UC1", 70, 5_000_000))
    assert o.depth_cue(header(70)) is None  # no camera_info yet: cannot back-project
    o._on_camera_info(camera_info())
    cue = o.depth_cue(header(70))
    assert cue is not None and cue.metres.shape == (2 * H, 2 * W) and np.allclose(cue.metres, 2.5)
    assert cue.intrinsics.fx == FX and (cue.min_depth, cue.max_depth) == (0.2, 8.0)
    assert o.depth_cue(header(71)) is None  # 1 s away: outside slop
    assert o.diagnostics()["points_matched"] == "0"
    labels, conf, rgb = frame_arrays()
    assert o.publish(header(70), labels, conf, rgb) is True and len(cap.msgs) == 1


def test_depth_decoded_once_for_cue_and_cloud(out: tuple[SemanticPointsOutput, Capture],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracker's cue and the frame's cloud read one decoding of the depth image (not one each), and the
    shared array is read-only: neither reader can change what the other sees."""
    from ovseg_ros.core import depth as dp

    calls = []
    real = dp.depth_msg_to_metres
    monkeypatch.setattr(dp, "depth_msg_to_metres", lambda *a, **k: calls.append(1) or real(*a, **k))
    o, cap = out
    o._on_camera_info(camera_info())
    o._on_depth(depth_image(np.full((2 * H, 2 * W), 2500, np.uint16), "16UC1", 80))
    cue = o.depth_cue(header(80))
    assert cue is not None and not cue.metres.flags.writeable
    labels, conf, rgb = frame_arrays()
    assert o.publish(header(80), labels, conf, rgb) is True and len(cap.msgs) == 1
    assert len(calls) == 1
