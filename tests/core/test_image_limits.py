"""Image decoders refuse before allocating, and raise only ConversionError (ROS-free: no rclpy needed)."""

from __future__ import annotations

import struct
import types
import zlib

import cv2
import numpy as np
import pytest

from ovseg_ros.ros.conversions import ConversionError, compressed_header_size, compressed_to_rgb, image_msg_to_rgb


def png_with_header(width: int, height: int, payload_bytes: int = 0) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height``, followed by a zlib stream of zeros (never decoded)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\0" * payload_bytes)
    return out + struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))


def jpeg_with_frame(width: int, height: int) -> bytes:
    ok, enc = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    data = bytearray(enc.tobytes())
    i = data.find(b"\xff\xc0")
    data[i + 5: i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def msg(data: bytes, fmt: str = "png") -> types.SimpleNamespace:
    return types.SimpleNamespace(format=fmt, data=data)


@pytest.mark.parametrize("side", [20000, 50000])
def test_huge_png_header_is_refused_before_decoding(side: int) -> None:
    data = png_with_header(side, side, 1 << 20)
    with pytest.raises(ConversionError, match=f"{side}x{side} .* refused before decoding"):
        compressed_to_rgb(msg(data), max_pixels=4096 * 4096)


def test_huge_jpeg_header_is_refused_before_decoding() -> None:
    assert compressed_header_size(jpeg_with_frame(30000, 20000)) == ("jpeg", 30000, 20000)
    with pytest.raises(ConversionError, match="refused before decoding"):
        compressed_to_rgb(msg(jpeg_with_frame(30000, 20000), "jpeg"), max_pixels=4096 * 4096)


def test_hard_cap_applies_without_a_limit() -> None:
    with pytest.raises(ConversionError, match="above max_image_pixels=67108864"):
        compressed_to_rgb(msg(png_with_header(9000, 9000)))


@pytest.mark.parametrize("data,fragment", [
    (b"", "no data"),
    (b"GIF89a" + b"\0" * 20, "neither PNG nor JPEG"),
    (b"\x89PNG\r\n\x1a\n\0\0", "IHDR"),
    (b"\xff\xd8\xff\xe0\x00", "frame header"),
    (png_with_header(4, 4)[:-20], "could not decode"),
])
def test_malformed_compressed_data(data: bytes, fragment: str) -> None:
    with pytest.raises(ConversionError, match=fragment):
        compressed_to_rgb(msg(data))


def test_valid_images_still_decode() -> None:
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for ext in (".png", ".jpg"):
        out = compressed_to_rgb(msg(cv2.imencode(ext, img)[1].tobytes()))
        assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    out = compressed_to_rgb(msg(bytearray(cv2.imencode(".png", img)[1].tobytes())))
    np.testing.assert_array_equal(out, img[:, :, ::-1])


@pytest.mark.parametrize("fields,fragment", [
    ({"encoding": {}}, "unsupported encoding"),
    ({"width": -3}, "zero-size"),
    ({"width": "4"}, "width must be an integer"),
    ({"step": 0}, "step must be positive"),
    ({"data": None}, "data must be bytes"),
    ({"data": [1, 2, 999] * 16}, "0..255"),
    ({"height": 2**40}, "above max_image_pixels"),
])
def test_image_fields_that_are_garbage(fields: dict, fragment: str) -> None:
    base = dict(encoding="rgb8", width=4, height=4, step=12, data=bytes(48), is_bigendian=0)
    with pytest.raises(ConversionError, match=fragment):
        image_msg_to_rgb(types.SimpleNamespace(**{**base, **fields}))
