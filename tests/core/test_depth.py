"""Depth decoding, nearest resampling, intrinsics from camera_info and projection (ovseg_ros.core.depth)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from ovseg_ros.core import depth as dp


def depth_msg(arr: np.ndarray, encoding: str, bigendian: bool = False, step: int | None = None,
              data: bytes | None = None) -> types.SimpleNamespace:
    h, w = arr.shape
    dtype = arr.dtype.newbyteorder(">" if bigendian else "<")
    raw = arr.astype(dtype).tobytes()
    row = w * arr.dtype.itemsize
    if step is not None and step > row:
        raw = b"".join(raw[i * row:(i + 1) * row] + b"\xab" * (step - row) for i in range(h))
    return types.SimpleNamespace(width=w, height=h, step=step or row, encoding=encoding, is_bigendian=bigendian,
                                 data=raw if data is None else data)


# --- decoding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bigendian", [False, True])
def test_16uc1_millimetres_zero_is_invalid(bigendian: bool) -> None:
    mm = np.array([[0, 1000, 2500], [65535, 1, 0]], np.uint16)
    out = dp.depth_msg_to_metres(depth_msg(mm, "16UC1", bigendian))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 1:], [1.0, 2.5])
    np.testing.assert_allclose(out[1, :2], [65.535, 0.001], rtol=1e-6)
    assert np.isnan(out[0, 0]) and np.isnan(out[1, 2])


def test_32fc1_metres_nan_inf_negative_zero_are_invalid() -> None:
    m = np.array([[1.5, np.nan, np.inf], [-2.0, 0.0, 3.25]], np.float32)
    out = dp.depth_msg_to_metres(depth_msg(m, "32FC1"))
    assert out[0, 0] == np.float32(1.5) and out[1, 2] == np.float32(3.25)
    assert np.isnan(out[[0, 0, 1, 1], [1, 2, 0, 1]]).all()


def test_row_padding_is_skipped() -> None:
    mm = np.arange(1, 13, dtype=np.uint16).reshape(3, 4) * 100
    out = dp.depth_msg_to_metres(depth_msg(mm, "16UC1", step=12))
    np.testing.assert_allclose(out, mm / 1000.0, rtol=1e-6)


@pytest.mark.parametrize("msg,reason", [
    (depth_msg(np.zeros((2, 2), np.uint8), "mono8"), "unsupported depth encoding 'mono8'"),
    (depth_msg(np.zeros((2, 2), np.uint8), "rgb8"), "unsupported depth encoding"),
    (depth_msg(np.zeros((0, 3), np.uint16), "16UC1"), "zero-size"),
    (depth_msg(np.zeros((2, 3), np.uint16), "16UC1", step=4), "smaller than a row"),
    (depth_msg(np.zeros((2, 3), np.uint16), "16UC1", data=b"\0" * 10), "data has 10 bytes"),
    (depth_msg(np.zeros((2, 3), np.float32), "32FC1", data=b"\0" * 30), "data has 30 bytes"),
    # 16-bit data labelled as 32FC1: the sizes betray it
    (depth_msg(np.zeros((2, 3), np.uint16), "32FC1", step=6), "smaller than a row"),
])
def test_bad_depth_is_refused_with_the_reason(msg: types.SimpleNamespace, reason: str) -> None:
    with pytest.raises(dp.DepthError, match=reason):
        dp.depth_msg_to_metres(msg)


def test_too_many_pixels() -> None:
    with pytest.raises(dp.DepthError, match="max_image_pixels"):
        dp.depth_msg_to_metres(depth_msg(np.ones((10, 10), np.uint16), "16UC1"), max_pixels=99)


# --- resampling -------------------------------------------------------------------------------------
def test_nearest_resampling_never_blends_an_edge() -> None:
    src = np.full((48, 64), 5.0, np.float32)
    src[:, :29] = 2.0  # person at 2 m, wall at 5 m
    src[10, 40] = np.nan
    for h, w in [(24, 32), (96, 128), (30, 40), (48, 64)]:
        out = dp.resample_nearest(src, h, w)
        assert out.shape == (h, w)
        finite = out[np.isfinite(out)]
        assert set(np.unique(finite)) <= {2.0, 5.0}
    up = dp.resample_nearest(src, 96, 128)
    assert (up[:, :58] == 2.0).all() and (up[:, 58:] == 5.0).sum() > 0
    np.testing.assert_array_equal(dp.resample_nearest(up, 48, 64)[:, :29], 2.0)


def test_resampling_maps_pixel_centres() -> None:
    src = np.arange(8, dtype=np.float32).reshape(1, 8)
    np.testing.assert_array_equal(dp.resample_nearest(src, 1, 4)[0], [1, 3, 5, 7])
    np.testing.assert_array_equal(dp.resample_nearest(src, 1, 16)[0], np.repeat(np.arange(8), 2))


def test_resample_rgb() -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (4, 6, 3), dtype=np.uint8)
    out = dp.resample_nearest(rgb, 8, 12)
    assert out.shape == (8, 12, 3) and (out[::2, ::2] == rgb).all()


def test_aspect_mismatch_is_refused() -> None:
    dp.check_aspect((480, 640), (240, 320), "depth")
    with pytest.raises(dp.DepthError, match="registered"):
        dp.check_aspect((720, 1280), (480, 640), "depth")


# --- intrinsics --------------------------------------------------------------------------------------
K = [500.0, 0, 320.0, 0, 510.0, 240.0, 0, 0, 1]
P = [480.0, 0, 318.0, 0, 0, 490.0, 242.0, 0, 0, 0, 1, 0]


def test_k_for_a_distorted_image_p_when_rectified() -> None:
    raw = dp.intrinsics_from_camera_info(K, P, 640, 480, d=[0.1, -0.02, 0, 0, 0])
    assert (raw.fx, raw.fy, raw.cx, raw.cy) == (500.0, 510.0, 320.0, 240.0)
    rect = dp.intrinsics_from_camera_info(K, P, 640, 480, d=[0, 0, 0, 0, 0])
    assert (rect.fx, rect.fy, rect.cx, rect.cy) == (480.0, 490.0, 318.0, 242.0)
    assert dp.intrinsics_from_camera_info(K, [0.0] * 12, 640, 480).fx == 500.0  # P unset: K
    assert dp.intrinsics_from_camera_info(K, P, 640, 480, d=[0.1], rectified=True).fx == 480.0
    assert dp.intrinsics_source(P, []) == "P" and dp.intrinsics_source(P, [0.1]) == "K"


@pytest.mark.parametrize("k,w,h,reason", [
    ([0.0] * 9, 640, 480, "invalid focal"),
    ([500, 0, 320, 0, float("nan"), 240, 0, 0, 1], 640, 480, "invalid focal"),
    (K, 0, 480, "zero size"),
    (K[:6], 640, 480, "K has 6 values"),
])
def test_uncalibrated_camera_info_is_refused(k: list, w: int, h: int, reason: str) -> None:
    with pytest.raises(dp.DepthError, match=reason):
        dp.intrinsics_from_camera_info(k, [0.0] * 12, w, h)


def test_scaled_intrinsics_keep_pixel_centres() -> None:
    intr = dp.Intrinsics(500.0, 500.0, 319.5, 239.5, 640, 480)
    half = intr.scaled(320, 240)
    assert (half.fx, half.fy, half.cx, half.cy) == (250.0, 250.0, 159.5, 119.5)
    assert intr.scaled(640, 480) is intr


# --- projection --------------------------------------------------------------------------------------
def test_known_intrinsics_give_known_points() -> None:
    intr = dp.Intrinsics(fx=100.0, fy=200.0, cx=2.0, cy=1.0, width=5, height=3)
    depth = np.full((3, 5), 2.0, np.float32)
    depth[0, 0] = 4.0
    pts = dp.project(depth, intr, 0.1, 10.0)
    assert pts.shape == (3, 5, 3) and pts.dtype == np.float32
    np.testing.assert_allclose(pts[1, 2], [0.0, 0.0, 2.0])  # principal point: on the optical axis
    np.testing.assert_allclose(pts[2, 4], [(4 - 2) / 100 * 2.0, (2 - 1) / 200 * 2.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(pts[0, 0], [(0 - 2) / 100 * 4.0, (0 - 1) / 200 * 4.0, 4.0], rtol=1e-6)
    # x right, y down (REP 103 optical frame): a pixel left of and above the centre has x < 0, y < 0
    assert pts[0, 0, 0] < 0 and pts[0, 0, 1] < 0


def test_out_of_range_and_invalid_give_nan_points() -> None:
    intr = dp.Intrinsics(10.0, 10.0, 1.0, 0.0, 3, 1)
    depth = np.array([[0.05, np.nan, 12.0]], np.float32)
    assert np.isnan(dp.project(depth, intr, 0.1, 10.0)).all()
    edge = dp.project(np.array([[0.1, 5.0, 10.0]], np.float32), intr, 0.1, 10.0)
    assert np.isfinite(edge).all()


def test_a_plane_projects_onto_itself_at_another_resolution() -> None:
    """A fronto-parallel wall at 3 m seen by a 640x480 depth camera and resampled to 320x240 labels."""
    intr = dp.intrinsics_from_camera_info(K, [0.0] * 12, 640, 480)
    depth = dp.resample_nearest(np.full((480, 640), 3.0, np.float32), 240, 320)
    pts = dp.project(depth, intr.scaled(320, 240), 0.1, 10.0)
    np.testing.assert_allclose(pts[..., 2], 3.0)
    # the label pixel (u', v') sees the ray of the full-resolution point ((u'+0.5)*2-0.5, ...)
    u, v = 100, 50
    np.testing.assert_allclose(pts[v, u, 0], ((u + 0.5) * 2 - 0.5 - 320.0) / 500.0 * 3.0, rtol=1e-5)
    np.testing.assert_allclose(pts[v, u, 1], ((v + 0.5) * 2 - 0.5 - 240.0) / 510.0 * 3.0, rtol=1e-5)


def test_pack_cloud_layout() -> None:
    pts = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    labels = np.array([[0, 1, 255], [2, 65535, 7]], np.uint16)
    conf = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[1, 2, 3], [4, 5, 6], [7, 8, 9]]], np.uint8)
    for with_rgb in (False, True):
        data, layout = dp.pack_cloud(pts, labels, conf, rgb if with_rgb else None)
        assert layout.point_step == (24 if with_rgb else 20) and data.size == 6 * layout.point_step
        names = [f[0] for f in layout.fields]
        assert names == ["x", "y", "z", "confidence", "label"] + (["rgb"] if with_rgb else [])
        rec = data.reshape(6, layout.point_step)
        off = {f[0]: f[1] for f in layout.fields}
        xyz = rec[:, :12].copy().view(np.float32).reshape(2, 3, 3)
        np.testing.assert_array_equal(xyz, pts)
        np.testing.assert_array_equal(rec[:, off["label"]:off["label"] + 2].copy().view(np.uint16).reshape(2, 3),
                                      labels)
        np.testing.assert_array_equal(
            rec[:, off["confidence"]:off["confidence"] + 4].copy().view(np.float32).reshape(2, 3), conf)
        if with_rgb:
            packed = rec[:, off["rgb"]:off["rgb"] + 4].copy().view(np.uint32).reshape(-1)
            assert packed[0] == 0xFF0000 and packed[1] == 0x00FF00 and packed[3] == 0x010203


@pytest.mark.parametrize("with_rgb", [False, True])
def test_fused_cloud_equals_project_then_pack(with_rgb: bool) -> None:
    rng = np.random.default_rng(3)
    h, w = 12, 16
    depth = rng.uniform(0.0, 12.0, (h, w)).astype(np.float32)
    depth[0, :4] = np.nan
    intr = dp.Intrinsics(20.0, 21.0, 7.5, 5.5, w, h)
    labels = rng.integers(-1, 300, (h, w)).astype(np.int32)
    conf = rng.random((h, w), dtype=np.float32)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if with_rgb else None
    lab16 = labels.astype(np.uint16)
    lab16[labels < 0] = 255
    ref, ref_layout = dp.pack_cloud(dp.project(depth, intr, 0.5, 10.0), lab16, conf, rgb)
    got, layout = dp.semantic_cloud(depth, intr, 0.5, 10.0, labels, conf, 255, rgb)
    assert layout == ref_layout
    np.testing.assert_array_equal(got, ref)  # byte for byte (NaNs included)
    with pytest.raises(dp.DepthError, match="differ"):
        dp.semantic_cloud(depth[:4], intr, 0.5, 10.0, labels, conf)
