"""sensor_msgs images <-> numpy, without ROS's cv_bridge (which is used instead when importable).

Only attribute access is used on messages, so these functions also work on any object shaped like
``sensor_msgs/Image`` / ``CompressedImage``. Every refusal raises :class:`ConversionError` with a reason
meant for logs and diagnostics: a node must never segment a frame whose buffer it had to guess about.
"""

from __future__ import annotations

import array
import sys
from dataclasses import dataclass
from typing import Any, Optional

import cv2
import numpy as np

__all__ = [
    "ConversionError",
    "ENCODINGS",
    "EncodingInfo",
    "validate_image_msg",
    "image_to_numpy",
    "to_rgb8",
    "image_msg_to_rgb",
    "compressed_to_rgb",
    "numpy_to_image",
    "make_cv_bridge",
    "image_msg_to_rgb_bridge",
]


class ConversionError(ValueError):
    """An input image that is refused; the message is the reason."""


@dataclass(frozen=True)
class EncodingInfo:
    """Layout of one encoding: channels, numpy element type, and channel order."""

    channels: int
    dtype: str  # "u1" or "u2"
    order: str  # "mono", "rgb", "bgr", "rgba", "bgra"

    @property
    def bytes_per_pixel(self) -> int:
        return self.channels * np.dtype(self.dtype).itemsize


#: Input encodings accepted. The OpenCV-style aliases follow OpenCV's (and cv_bridge's) BGR convention.
ENCODINGS: dict[str, EncodingInfo] = {
    "rgb8": EncodingInfo(3, "u1", "rgb"),
    "bgr8": EncodingInfo(3, "u1", "bgr"),
    "rgba8": EncodingInfo(4, "u1", "rgba"),
    "bgra8": EncodingInfo(4, "u1", "bgra"),
    "mono8": EncodingInfo(1, "u1", "mono"),
    "mono16": EncodingInfo(1, "u2", "mono"),
    "rgb16": EncodingInfo(3, "u2", "rgb"),
    "bgr16": EncodingInfo(3, "u2", "bgr"),
    "8UC1": EncodingInfo(1, "u1", "mono"),
    "8UC3": EncodingInfo(3, "u1", "bgr"),
    "8UC4": EncodingInfo(4, "u1", "bgra"),
    "16UC1": EncodingInfo(1, "u2", "mono"),
}

#: Output encodings written by :func:`numpy_to_image` (numpy dtype, channels).
_OUTPUT = {
    "mono8": (np.uint8, 1),
    "mono16": (np.uint16, 1),
    "rgb8": (np.uint8, 3),
    "bgr8": (np.uint8, 3),
    "32SC1": (np.int32, 1),
    "32FC1": (np.float32, 1),
}


def validate_image_msg(msg: Any, max_pixels: Optional[int] = None) -> EncodingInfo:
    """Check that ``msg``'s fields describe its buffer consistently; return the encoding's layout.

    Raises:
        ConversionError: unsupported encoding, zero size, too many pixels, a ``step`` smaller than a row
            (the encoding lies about the data), or a buffer whose size is not ``step * height``.
    """
    enc = ENCODINGS.get(msg.encoding)
    if enc is None:
        raise ConversionError(
            f"unsupported encoding {msg.encoding!r}; supported: {', '.join(ENCODINGS)} (or use image/compressed)"
        )
    width, height, step = int(msg.width), int(msg.height), int(msg.step)
    if width == 0 or height == 0:
        raise ConversionError(f"zero-size image ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ConversionError(
            f"image {width}x{height} has {width * height} pixels, above max_image_pixels={max_pixels}"
        )
    row = width * enc.bytes_per_pixel
    if step < row:
        raise ConversionError(
            f"step {step} is smaller than width*bytes_per_pixel = {width}*{enc.bytes_per_pixel} = {row} "
            f"for encoding {msg.encoding!r} (encoding and data disagree)"
        )
    size = len(msg.data)
    if size < step * height:
        raise ConversionError(f"data has {size} bytes, shorter than step*height = {step}*{height} = {step * height}")
    if size != step * height:
        raise ConversionError(
            f"data has {size} bytes but step*height = {step}*{height} = {step * height} (encoding and data disagree)"
        )
    return enc


def image_to_numpy(msg: Any, max_pixels: Optional[int] = None) -> np.ndarray:
    """The image as stored, like cv_bridge's ``passthrough``: (H, W) or (H, W, C), native byte order.

    Row padding (``step`` beyond the row) is removed and big-endian 16-bit data is byte-swapped.
    The result may share memory with ``msg.data``.
    """
    enc = validate_image_msg(msg, max_pixels)
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    raw = np.frombuffer(msg.data, dtype=np.uint8)
    row = w * enc.bytes_per_pixel
    if step != row:
        raw = np.ascontiguousarray(raw.reshape(h, step)[:, :row])
    dtype = np.dtype(enc.dtype)
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if msg.is_bigendian else "<")
    arr = raw.view(dtype)
    if not dtype.isnative:
        arr = arr.astype(dtype.newbyteorder("="))
    shape = (h, w) if enc.channels == 1 else (h, w, enc.channels)
    return arr.reshape(shape)


def to_rgb8(arr: np.ndarray, encoding: str) -> np.ndarray:
    """A passthrough array of ``encoding`` -> (H, W, 3) uint8 RGB, C-contiguous (16-bit keeps the high byte)."""
    enc = ENCODINGS.get(encoding)
    if enc is None:
        raise ConversionError(f"unsupported encoding {encoding!r}")
    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    if enc.order == "mono":
        return cv2.cvtColor(np.ascontiguousarray(arr.reshape(arr.shape[:2])), cv2.COLOR_GRAY2RGB)
    code = {"rgb": None, "bgr": cv2.COLOR_BGR2RGB, "rgba": cv2.COLOR_RGBA2RGB, "bgra": cv2.COLOR_BGRA2RGB}[enc.order]
    arr = np.ascontiguousarray(arr)
    return arr if code is None else cv2.cvtColor(arr, code)


def image_msg_to_rgb(msg: Any, max_pixels: Optional[int] = None) -> np.ndarray:
    """sensor_msgs/Image -> (H, W, 3) uint8 RGB with our converter. Raises :class:`ConversionError`."""
    return to_rgb8(image_to_numpy(msg, max_pixels), msg.encoding)


def compressed_to_rgb(msg: Any, max_pixels: Optional[int] = None) -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG/PNG/...) -> (H, W, 3) uint8 RGB via ``cv2.imdecode``."""
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    if buf.size == 0:
        raise ConversionError("compressed image has no data")
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ConversionError(f"could not decode compressed image (format {msg.format!r}, {buf.size} bytes)")
    h, w = img.shape[:2]
    if h == 0 or w == 0:
        raise ConversionError(f"zero-size image ({w}x{h})")
    if max_pixels is not None and h * w > max_pixels:
        raise ConversionError(f"image {w}x{h} has {w * h} pixels, above max_image_pixels={max_pixels}")
    channels = 1 if img.ndim == 2 else img.shape[2]
    encoding = {1: "mono16" if img.dtype == np.uint16 else "mono8", 3: "bgr8", 4: "bgra8"}.get(channels)
    if encoding is None or img.dtype not in (np.uint8, np.uint16):
        raise ConversionError(f"decoded image has unsupported layout {img.shape} {img.dtype}")
    if img.dtype == np.uint16 and channels > 1:
        img = (img >> 8).astype(np.uint8)
    return to_rgb8(img, encoding)


def numpy_to_image(arr: np.ndarray, encoding: str, header: Any, msg_type: Optional[type] = None) -> Any:
    """(H, W) or (H, W, C) array -> sensor_msgs/Image with ``header`` (the same object, copied on publish).

    Multi-byte data is written in native order with ``is_bigendian`` set to match.
    """
    if msg_type is None:
        from sensor_msgs.msg import Image as msg_type  # noqa: N813  (lazy: keeps this module ROS-free to import)
    dtype, channels = _OUTPUT[encoding]
    if arr.dtype != dtype or arr.ndim not in (2, 3) or (arr.shape[2] if arr.ndim == 3 else 1) != channels:
        raise ValueError(f"{encoding} needs a {dtype.__name__} array with {channels} channel(s), got {arr.shape} {arr.dtype}")
    arr = np.ascontiguousarray(arr)
    msg = msg_type()
    msg.header = header
    msg.height, msg.width = int(arr.shape[0]), int(arr.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = arr.dtype.itemsize > 1 and sys.byteorder == "big"
    msg.step = int(arr.shape[1] * channels * arr.dtype.itemsize)
    # array('B') is the fast path of rosidl's uint8[] setter (other sequences are checked per element).
    data = array.array("B")
    data.frombytes(arr.reshape(-1).view(np.uint8).data)
    msg.data = data
    return msg


def make_cv_bridge() -> Optional[Any]:
    """ROS's ``cv_bridge.CvBridge()`` when importable (a ROS install), else None."""
    try:
        from cv_bridge import CvBridge  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001  (ImportError, or a cv_bridge built against another numpy)
        return None
    try:
        return CvBridge()
    except Exception:  # noqa: BLE001
        return None


def image_msg_to_rgb_bridge(bridge: Any, msg: Any, max_pixels: Optional[int] = None) -> np.ndarray:
    """Like :func:`image_msg_to_rgb`, but the buffer is read by ROS's cv_bridge after our checks."""
    validate_image_msg(msg, max_pixels)
    try:
        arr = bridge.imgmsg_to_cv2(msg, desired_encoding="passthrough")
    except Exception as exc:  # noqa: BLE001  (CvBridgeError and numpy errors)
        raise ConversionError(f"cv_bridge refused the image: {exc}") from exc
    return to_rgb8(np.asarray(arr), msg.encoding)
