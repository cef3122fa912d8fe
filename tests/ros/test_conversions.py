"""Unit tests of the image conversions (ovseg_ros/ros/conversions.py): every encoding, padding, byte order,
every refusal, compressed input, output messages, and agreement with ROS's cv_bridge where installed."""

from __future__ import annotations

import array
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest

from ovseg_ros.ros.conversions import (
    ENCODINGS,
    ConversionError,
    compressed_to_rgb,
    image_msg_to_rgb,
    image_msg_to_rgb_bridge,
    image_to_numpy,
    make_cv_bridge,
    numpy_to_image,
    validate_image_msg,
)

RNG = np.random.default_rng(0)
H, W = 5, 7


def image_type() -> Any:
    """The real sensor_msgs/Image when ROS is importable (its data field is an array('B')), else a stand-in."""
    try:
        from sensor_msgs.msg import Image

        return Image
    except ImportError:
        return lambda: SimpleNamespace(header=None)


def make_msg(arr: np.ndarray, encoding: str, pad: int = 0, bigendian: bool = False) -> Any:
    """Pack ``arr`` (H, W[, C]) like a camera driver would, with ``pad`` extra bytes per row."""
    h, w = arr.shape[:2]
    if arr.dtype.itemsize > 1:
        arr = arr.astype(arr.dtype.newbyteorder(">" if bigendian else "<"))
    rows = arr.reshape(h, -1).view(np.uint8).reshape(h, -1)
    rows = np.concatenate([rows, np.full((h, pad), 0xAB, np.uint8)], axis=1)
    msg = image_type()()
    msg.height, msg.width, msg.encoding = h, w, encoding
    msg.is_bigendian = bigendian
    msg.step = rows.shape[1]
    data = array.array("B")
    data.frombytes(rows.tobytes())
    msg.data = data
    return msg


def sample(encoding: str) -> np.ndarray:
    info = ENCODINGS[encoding]
    dtype = np.uint16 if info.dtype == "u2" else np.uint8
    shape = (H, W) if info.channels == 1 else (H, W, info.channels)
    return RNG.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)


def expected_rgb(arr: np.ndarray, encoding: str) -> np.ndarray:
    order = ENCODINGS[encoding].order
    a = (arr >> 8).astype(np.uint8) if arr.dtype == np.uint16 else arr
    if order == "mono":
        return np.repeat(a[..., None], 3, axis=2)
    idx = {"rgb": [0, 1, 2], "bgr": [2, 1, 0], "rgba": [0, 1, 2], "bgra": [2, 1, 0]}[order]
    return a[..., idx]


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("pad", [0, 3])
def test_every_encoding_with_and_without_padding(encoding: str, pad: int) -> None:
    arr = sample(encoding)
    msg = make_msg(arr, encoding, pad=pad)
    np.testing.assert_array_equal(image_to_numpy(msg), arr)
    rgb = image_msg_to_rgb(msg)
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb, expected_rgb(arr, encoding))


@pytest.mark.parametrize("encoding", ["mono16", "16UC1", "rgb16", "bgr16"])
@pytest.mark.parametrize("pad", [0, 1])
def test_big_endian_16_bit_is_byte_swapped(encoding: str, pad: int) -> None:
    arr = sample(encoding)
    little = make_msg(arr, encoding, pad=pad)
    big = make_msg(arr, encoding, pad=pad, bigendian=True)
    assert bytes(little.data) != bytes(big.data)
    native = image_to_numpy(big)
    assert native.dtype.isnative
    np.testing.assert_array_equal(native, arr)
    np.testing.assert_array_equal(image_msg_to_rgb(big), image_msg_to_rgb(little))


def test_mono16_keeps_the_high_byte() -> None:
    arr = np.array([[0, 255, 256, 65535]], dtype=np.uint16)
    rgb = image_msg_to_rgb(make_msg(arr, "mono16"))
    assert rgb[0, :, 0].tolist() == [0, 0, 1, 255]


def test_refuses_unsupported_encoding() -> None:
    msg = make_msg(sample("rgb8"), "rgb8")
    msg.encoding = "yuv422"
    with pytest.raises(ConversionError, match="unsupported encoding 'yuv422'"):
        image_msg_to_rgb(msg)


def test_refuses_encoding_that_lies_about_the_data() -> None:
    msg = make_msg(sample("mono8"), "mono8")  # W bytes per row ...
    msg.encoding = "rgb8"  # ... claimed to be 3*W
    with pytest.raises(ConversionError, match="step .* smaller than width"):
        image_msg_to_rgb(msg)


def test_refuses_data_shorter_than_step_times_height() -> None:
    msg = make_msg(sample("rgb8"), "rgb8")
    msg.data = msg.data[:-1]
    with pytest.raises(ConversionError, match="shorter than step\\*height"):
        image_msg_to_rgb(msg)


def test_refuses_data_longer_than_step_times_height() -> None:
    msg = make_msg(sample("rgb8"), "rgb8")
    msg.data = msg.data + msg.data[:5]
    with pytest.raises(ConversionError, match="disagree"):
        image_msg_to_rgb(msg)


@pytest.mark.parametrize("size", [(0, 0), (0, 4), (4, 0)])
def test_refuses_zero_size(size: tuple[int, int]) -> None:
    msg = make_msg(sample("rgb8"), "rgb8")
    msg.width, msg.height = size
    msg.step = size[0] * 3
    msg.data = array.array("B")
    with pytest.raises(ConversionError, match="zero-size"):
        image_msg_to_rgb(msg)


def test_refuses_above_max_pixels() -> None:
    msg = make_msg(sample("rgb8"), "rgb8")
    with pytest.raises(ConversionError, match="above max_image_pixels=34"):
        image_msg_to_rgb(msg, max_pixels=H * W - 1)
    assert image_msg_to_rgb(msg, max_pixels=H * W).shape == (H, W, 3)


def test_validate_returns_layout() -> None:
    info = validate_image_msg(make_msg(sample("bgra8"), "bgra8"))
    assert (info.channels, info.dtype, info.order, info.bytes_per_pixel) == (4, "u1", "bgra", 4)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_compressed_color(ext: str) -> None:
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, :12] = (250, 10, 10)
    rgb[:, 12:] = (10, 10, 250)
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    out = compressed_to_rgb(SimpleNamespace(format=ext[1:], data=buf.tobytes()))
    assert out.shape == rgb.shape
    if ext == ".png":
        np.testing.assert_array_equal(out, rgb)
    else:  # lossy, and chroma is subsampled across the colour edge: compare away from it
        for cols in (slice(0, 8), slice(16, 24)):
            assert np.abs(out[:, cols].astype(int) - rgb[:, cols].astype(int)).max() <= 20


def test_compressed_mono16_png() -> None:
    mono = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    ok, buf = cv2.imencode(".png", mono)
    out = compressed_to_rgb(SimpleNamespace(format="png", data=buf.tobytes()))
    np.testing.assert_array_equal(out[..., 0], (mono >> 8).astype(np.uint8))


def test_compressed_refusals() -> None:
    with pytest.raises(ConversionError, match="could not decode"):
        compressed_to_rgb(SimpleNamespace(format="jpeg", data=b"not an image"))
    with pytest.raises(ConversionError, match="no data"):
        compressed_to_rgb(SimpleNamespace(format="jpeg", data=b""))
    ok, buf = cv2.imencode(".png", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ConversionError, match="max_image_pixels"):
        compressed_to_rgb(SimpleNamespace(format="png", data=buf.tobytes()), max_pixels=99)


@pytest.mark.parametrize(
    "encoding,arr",
    [
        ("mono8", RNG.integers(0, 255, (H, W), dtype=np.uint8)),
        ("mono16", RNG.integers(0, 65535, (H, W), dtype=np.uint16)),
        ("rgb8", RNG.integers(0, 255, (H, W, 3), dtype=np.uint8)),
        ("32SC1", RNG.integers(-5, 1 << 20, (H, W), dtype=np.int32)),
    ],
)
def test_output_images_round_trip(encoding: str, arr: np.ndarray) -> None:
    header = object()
    msg = numpy_to_image(arr, encoding, header, msg_type=image_type())
    assert msg.header is header and msg.encoding == encoding
    assert (msg.height, msg.width, msg.step) == (H, W, W * arr.itemsize * (3 if arr.ndim == 3 else 1))
    assert isinstance(msg.data, (array.array, bytes, list))
    back = np.frombuffer(bytes(msg.data), dtype=arr.dtype.newbyteorder(">" if msg.is_bigendian else "<"))
    np.testing.assert_array_equal(back.reshape(arr.shape), arr)
    if encoding in ENCODINGS:  # inputs and outputs agree
        np.testing.assert_array_equal(image_to_numpy(msg), arr)


def test_output_rejects_wrong_dtype() -> None:
    with pytest.raises(ValueError, match="mono8 needs"):
        numpy_to_image(np.zeros((2, 2), np.uint16), "mono8", None, msg_type=image_type())


BRIDGE = make_cv_bridge()


@pytest.mark.skipif(BRIDGE is None, reason="ROS cv_bridge is not installed here (not on PyPI); ours is used")
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "8UC3", "8UC1"])
@pytest.mark.parametrize("pad", [0, 2])
@pytest.mark.parametrize("bigendian", [False, True])
def test_cv_bridge_and_ours_agree(encoding: str, pad: int, bigendian: bool) -> None:
    if bigendian and ENCODINGS[encoding].dtype == "u1":
        pytest.skip("byte order only matters for 16-bit data")
    msg = make_msg(sample(encoding), encoding, pad=pad, bigendian=bigendian)
    ours = image_to_numpy(msg)
    theirs = np.asarray(BRIDGE.imgmsg_to_cv2(msg, desired_encoding="passthrough"))
    np.testing.assert_array_equal(theirs.astype(ours.dtype), ours)
    np.testing.assert_array_equal(image_msg_to_rgb_bridge(BRIDGE, msg), image_msg_to_rgb(msg))
