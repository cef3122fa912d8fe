"""sensor_msgs images <-> numpy, without ROS's cv_bridge (which is used instead when importable).

Only attribute access is used on messages, so these functions also work on any object shaped like
``sensor_msgs/Image`` / ``CompressedImage``. Every refusal raises :class:`ConversionError` with a reason
meant for logs and diagnostics: a node must never segment a frame whose buffer it had to guess about.
"""

from __future__ import annotations

import array
import struct
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
    "compressed_header_size",
    "MAX_PIXELS_HARD",
    "MAX_COMPRESSED_BYTES",
]

#: Refused whatever ``max_pixels`` says: the core's check_image limit.
MAX_PIXELS_HARD = 8192 * 8192
#: Largest compressed payload decoded (a 8192x8192 PNG of noise is ~200 MB; camera JPEGs are a few MB).
MAX_COMPRESSED_BYTES = 256 * 1024 * 1024


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
    "16UC1": (np.uint16, 1),  # ~/panoptic ids in 16 bits (panoptic_format: uint16)
    "rgb8": (np.uint8, 3),
    "bgr8": (np.uint8, 3),
    "32SC1": (np.int32, 1),
    "32FC1": (np.float32, 1),
}


def _limit(max_pixels: Optional[int]) -> int:
    return MAX_PIXELS_HARD if max_pixels is None else min(int(max_pixels), MAX_PIXELS_HARD)


def _as_bytes(data: Any) -> memoryview:
    """``msg.data`` (bytes, array('B'), numpy uint8, list of ints) as a flat byte view, or ConversionError."""
    if isinstance(data, (bytes, bytearray)):
        return memoryview(data)
    if isinstance(data, array.array) and data.typecode in ("B", "b"):
        return memoryview(data).cast("B")
    if isinstance(data, np.ndarray) and data.dtype in (np.uint8, np.int8):
        return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    if isinstance(data, memoryview):
        if data.itemsize != 1:
            raise ConversionError(f"data must be bytes, got a buffer of {data.itemsize}-byte items")
        return data.cast("B") if data.format != "B" else data
    if isinstance(data, (list, tuple)):
        try:
            return memoryview(bytes(data))
        except (TypeError, ValueError) as exc:
            raise ConversionError(f"data must be a sequence of bytes (0..255): {exc}") from None
    raise ConversionError(f"data must be bytes, got {type(data).__name__}")


def _int_field(msg: Any, name: str) -> int:
    value = getattr(msg, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConversionError(f"{name} must be an integer, got {type(value).__name__}")
    return int(value)


def validate_image_msg(msg: Any, max_pixels: Optional[int] = None) -> EncodingInfo:
    """Check that ``msg``'s fields describe its buffer consistently; return the encoding's layout.

    Raises:
        ConversionError: unsupported encoding, zero size, too many pixels, a ``step`` smaller than a row
            (the encoding lies about the data), or a buffer whose size is not ``step * height``; also any
            malformed field (wrong type, negative) — never another exception.
    """
    try:
        return _validate_image_msg(msg, max_pixels)
    except ConversionError:
        raise
    except Exception as exc:  # noqa: BLE001  (whatever a peer put in the fields, the answer is a refusal)
        raise ConversionError(f"malformed Image message ({type(exc).__name__}: {str(exc)[:160]})") from None


def _validate_image_msg(msg: Any, max_pixels: Optional[int]) -> EncodingInfo:
    encoding = msg.encoding
    enc = ENCODINGS.get(encoding) if isinstance(encoding, str) else None
    if enc is None:
        shown = repr(encoding[:40]) if isinstance(encoding, str) else type(encoding).__name__
        raise ConversionError(
            f"unsupported encoding {shown}; supported: {', '.join(ENCODINGS)} (or use image/compressed)"
        )
    width, height, step = _int_field(msg, "width"), _int_field(msg, "height"), _int_field(msg, "step")
    if width <= 0 or height <= 0:
        raise ConversionError(f"zero-size image ({width}x{height})")
    if step <= 0:
        raise ConversionError(f"step must be positive, got {step}")
    limit = _limit(max_pixels)
    if width * height > limit:
        raise ConversionError(
            f"image {width}x{height} has {width * height} pixels, above max_image_pixels={limit}"
        )
    row = width * enc.bytes_per_pixel
    if step < row:
        raise ConversionError(
            f"step {step} is smaller than width*bytes_per_pixel = {width}*{enc.bytes_per_pixel} = {row} "
            f"for encoding {msg.encoding!r} (encoding and data disagree)"
        )
    size = _as_bytes(msg.data).nbytes
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
    raw = np.frombuffer(_as_bytes(msg.data), dtype=np.uint8)
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
    """sensor_msgs/Image -> (H, W, 3) uint8 RGB with our converter. Raises only :class:`ConversionError`."""
    try:
        return to_rgb8(image_to_numpy(msg, max_pixels), msg.encoding)
    except ConversionError:
        raise
    except Exception as exc:  # noqa: BLE001  (numpy/OpenCV errors on inputs our checks let through)
        raise ConversionError(f"could not convert Image ({type(exc).__name__}: {str(exc)[:160]})") from None


# --- compressed images ----------------------------------------------------------------------------------
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: JPEG start-of-frame markers (baseline, extended, progressive, lossless, hierarchical, arithmetic);
#: 0xC4 (DHT), 0xC8 (JPG) and 0xCC (DAC) share the range but are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def compressed_header_size(data: bytes | memoryview) -> tuple[str, int, int]:
    """(format, width, height) read from a PNG or JPEG header, without decoding any pixel.

    Raises:
        ConversionError: not PNG or JPEG, or a header that is truncated or malformed.
    """
    buf = bytes(data[:8])
    if buf == _PNG_SIGNATURE:
        head = bytes(data[8:33])
        if len(head) < 25 or head[4:8] != b"IHDR":
            raise ConversionError("PNG without a valid IHDR header (truncated or malformed)")
        width, height = struct.unpack(">II", head[8:16])
        return "png", width, height
    if buf[:2] == b"\xff\xd8":
        return ("jpeg",) + _jpeg_size(data)
    raise ConversionError(
        f"could not decode compressed image: neither PNG nor JPEG (starts with {buf[:8].hex() or 'nothing'}); "
        "only png and jpeg are decoded"
    )


def _jpeg_size(data: bytes | memoryview) -> tuple[int, int]:
    n = len(data)
    i = 2
    while i < n:
        if data[i] != 0xFF:
            raise ConversionError(f"JPEG header is malformed (expected a marker at byte {i})")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # markers without a length
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        if i + 2 > n:
            break
        length = (data[i] << 8) | data[i + 1]
        if length < 2:
            raise ConversionError(f"JPEG segment at byte {i} has an invalid length {length}")
        if marker in _JPEG_SOF:
            if i + 7 > n:
                break
            height = (data[i + 3] << 8) | data[i + 4]
            width = (data[i + 5] << 8) | data[i + 6]
            return width, height
        i += length
    raise ConversionError("JPEG without a frame header (truncated or malformed)")


def compressed_to_rgb(msg: Any, max_pixels: Optional[int] = None) -> np.ndarray:
    """sensor_msgs/CompressedImage (PNG or JPEG) -> (H, W, 3) uint8 RGB via ``cv2.imdecode``.

    The size is read from the file header first and refused *before* decoding when it exceeds
    ``max_pixels``, so a small file claiming a huge image never allocates. Raises only :class:`ConversionError`.
    """
    try:
        return _compressed_to_rgb(msg, max_pixels)
    except ConversionError:
        raise
    except Exception as exc:  # noqa: BLE001  (cv2.error and anything else a hostile file triggers)
        raise ConversionError(f"could not decode compressed image ({type(exc).__name__}: {str(exc)[:160]})") from None


def _compressed_to_rgb(msg: Any, max_pixels: Optional[int]) -> np.ndarray:
    data = _as_bytes(msg.data)
    if data.nbytes == 0:
        raise ConversionError("compressed image has no data")
    if data.nbytes > MAX_COMPRESSED_BYTES:
        raise ConversionError(f"compressed image of {data.nbytes} bytes is larger than {MAX_COMPRESSED_BYTES}")
    fmt, width, height = compressed_header_size(data)
    if width == 0 or height == 0:
        raise ConversionError(f"zero-size image ({width}x{height}) in the {fmt} header")
    limit = _limit(max_pixels)
    if width * height > limit:
        raise ConversionError(
            f"{fmt} header says {width}x{height} = {width * height} pixels, above max_image_pixels={limit}; "
            "refused before decoding"
        )
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ConversionError(f"could not decode the {fmt} image ({buf.size} bytes; corrupt or truncated)")
    h, w = img.shape[:2]
    if (w, h) != (width, height):
        raise ConversionError(f"decoded {fmt} is {w}x{h} but its header says {width}x{height}")
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
        return to_rgb8(np.asarray(arr), msg.encoding)
    except ConversionError:
        raise
    except Exception as exc:  # noqa: BLE001  (CvBridgeError, numpy and OpenCV errors)
        raise ConversionError(f"cv_bridge refused the image: {str(exc)[:160]}") from None
