"""Depth images -> an organised, pixel-aligned point cloud (ROS-free, numpy, vectorised).

The semantic point cloud gives every label pixel a 3D point, which Nav2's semantic segmentation layer
(kiwicampus/semantic_segmentation_layer) needs to drop labels into costmap cells. Conventions followed:

* REP 118 (depth images): ``16UC1`` holds millimetres, ``32FC1`` metres; 0 (16UC1) and NaN/±inf (32FC1)
  mean "no reading". Negative values cannot be a distance, so they are invalid too.
* REP 103/105: points are in the camera's optical frame (x right, y down, z forward), the frame of the
  image header. Invalid or out-of-range depth gives NaN points (organised cloud: one point per pixel, like
  depth_image_proc's ``point_cloud_xyz``).
* Pinhole model of sensor_msgs/CameraInfo: ``K`` for a raw image, ``P`` (its left 3x3) for a rectified one;
  intrinsics are rescaled to the label image's resolution (pixel-centre convention), so depth registered to
  the colour camera at another resolution still lines up with the labels.

Resampling is nearest-neighbour: a depth edge (person 2 m, wall 5 m) must not blend into points floating at
3.5 m between them, which interpolation would create.

Every refusal raises :class:`DepthError` whose message is the reason (for logs and diagnostics).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

__all__ = [
    "DepthError",
    "DEPTH_ENCODINGS",
    "Intrinsics",
    "check_depth_msg",
    "decode_depth",
    "depth_msg_to_metres",
    "resample_nearest",
    "intrinsics_from_camera_info",
    "check_aspect",
    "intrinsics_source",
    "project",
    "CloudLayout",
    "cloud_layout",
    "pack_cloud",
    "semantic_cloud",
]

#: encoding -> (numpy dtype code, metres per unit). mono16 is accepted as 16UC1 (same bytes, drivers differ).
DEPTH_ENCODINGS: dict[str, tuple[str, float]] = {
    "16UC1": ("u2", 0.001),
    "mono16": ("u2", 0.001),
    "32FC1": ("f4", 1.0),
}
#: Relative aspect-ratio difference above which depth and labels are not the same view.
ASPECT_TOLERANCE = 0.02


class DepthError(ValueError):
    """A depth image or camera_info that is refused; the message is the reason."""


# --- decoding --------------------------------------------------------------------------------------
def check_depth_msg(msg: Any, max_pixels: Optional[int] = None) -> tuple[str, float]:
    """Check a sensor_msgs/Image-like depth message's layout (no decoding); (dtype code, metres per unit).

    Raises:
        DepthError: unsupported encoding, zero size, too many pixels, ``step`` shorter than a row, or a buffer
            whose size is not ``step * height``.
    """
    spec = DEPTH_ENCODINGS.get(msg.encoding)
    if spec is None:
        raise DepthError(
            f"unsupported depth encoding {msg.encoding!r}; supported: {', '.join(DEPTH_ENCODINGS)} "
            "(REP 118: 16UC1 millimetres or 32FC1 metres)"
        )
    width, height, step = int(msg.width), int(msg.height), int(msg.step)
    if width == 0 or height == 0:
        raise DepthError(f"zero-size depth image ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise DepthError(f"depth image {width}x{height} has more than max_image_pixels={max_pixels} pixels")
    row = width * np.dtype(spec[0]).itemsize
    if step < row:
        raise DepthError(f"depth step {step} is smaller than a row ({width} x {np.dtype(spec[0]).itemsize} bytes "
                         f"for {msg.encoding}): encoding and data disagree")
    size = len(msg.data)
    if size != step * height:
        raise DepthError(f"depth data has {size} bytes but step*height = {step}*{height} = {step * height}")
    return spec


def decode_depth(
    data: Any, width: int, height: int, step: int, encoding: str, is_bigendian: bool = False
) -> np.ndarray:
    """Raw depth buffer -> (H, W) float32 metres, NaN where there is no valid reading (0, NaN, inf, < 0)."""
    code, scale = DEPTH_ENCODINGS[encoding]
    dtype = np.dtype(code).newbyteorder(">" if is_bigendian else "<")
    raw = np.frombuffer(data, dtype=np.uint8)
    row = width * dtype.itemsize
    if step != row:
        raw = raw.reshape(height, step)[:, :row]
    arr = np.ascontiguousarray(raw).view(dtype).reshape(height, width)
    if code == "u2":
        out = arr.astype(np.float32)
        out *= np.float32(scale)
        out[arr == 0] = np.nan
        return out
    out = arr.astype(np.float32, copy=True)  # native order, writable
    with np.errstate(invalid="ignore"):
        out[~(out > 0) | ~np.isfinite(out)] = np.nan  # also catches NaN (comparison is False)
    return out


def depth_msg_to_metres(msg: Any, max_pixels: Optional[int] = None) -> np.ndarray:
    """sensor_msgs/Image-like depth -> (H, W) float32 metres with NaN for invalid. Raises :class:`DepthError`."""
    check_depth_msg(msg, max_pixels)
    return decode_depth(msg.data, int(msg.width), int(msg.height), int(msg.step), msg.encoding,
                        bool(msg.is_bigendian))


# --- resampling ------------------------------------------------------------------------------------
def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel centre: floor((i + 0.5) * n_in / n_out)."""
    idx = ((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def resample_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w[, C]) -> (height, width[, C]) by nearest neighbour: every output value is an input value."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    rows = _nearest_index(height, h)
    cols = _nearest_index(width, w)
    return image[rows[:, None], cols[None, :]]


def check_aspect(src: tuple[int, int], dst: tuple[int, int], what: str) -> None:
    """Refuse ``src`` (h, w) that cannot be a rescaled view of ``dst`` (h, w): different aspect ratios."""
    (sh, sw), (dh, dw) = src, dst
    a, b = sw / sh, dw / dh
    if abs(a - b) / b > ASPECT_TOLERANCE:
        raise DepthError(
            f"{what} is {sw}x{sh} but the label image is {dw}x{dh} (aspect {a:.3f} vs {b:.3f}): the depth must "
            "be registered to the colour camera (e.g. RealSense aligned_depth_to_color)"
        )


# --- intrinsics ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics of an image of ``width`` x ``height`` pixels."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def scaled(self, width: int, height: int) -> "Intrinsics":
        """The same camera seen at another resolution (pixel centres map to pixel centres)."""
        if (width, height) == (self.width, self.height):
            return self
        sx, sy = width / self.width, height / self.height
        return Intrinsics(self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5,
                          width, height)


def intrinsics_from_camera_info(
    k: Sequence[float],
    p: Sequence[float],
    width: int,
    height: int,
    d: Sequence[float] = (),
    rectified: Optional[bool] = None,
) -> Intrinsics:
    """Intrinsics from CameraInfo's ``K`` (3x3 row-major) and ``P`` (3x4).

    ``rectified`` None (auto): the image counts as rectified when ``P`` is set and the distortion ``D`` is empty
    or all zero (what drivers publish for aligned/rectified depth); then ``P`` is used, as depth_image_proc does,
    else ``K``. Distortion is not undone: a raw, distorted depth image gives approximate points.

    Raises:
        DepthError: zero size, focal lengths that are not positive finite numbers or outside
            :data:`FOCAL_RANGE` times the image side, or a principal point farther than
            :data:`MAX_CENTRE_OFFSET` image sides from the centre (``fx=1e-300`` or ``cx=1e30`` would give
            infinite points).
    """
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise DepthError(f"camera_info has zero size ({width}x{height}); it is not calibrated")
    k = [float(v) for v in k]
    p = [float(v) for v in p]
    if len(k) != 9:
        raise DepthError(f"camera_info K has {len(k)} values, expected 9")
    if (intrinsics_source(p, d) if rectified is None else ("P" if rectified and _p_set(p) else "K")) == "P":
        fx, fy, cx, cy = p[0], p[5], p[2], p[6]
        source = "P"
    else:
        fx, fy, cx, cy = k[0], k[4], k[2], k[5]
        source = "K"
    if not all(np.isfinite(v) for v in (fx, fy, cx, cy)) or fx <= 0 or fy <= 0:
        raise DepthError(f"camera_info {source} has invalid focal lengths (fx={fx}, fy={fy}): not calibrated")
    lo, hi = FOCAL_RANGE
    for name, f, side in (("fx", fx, width), ("fy", fy, height)):
        if not lo * side <= f <= hi * side:
            raise DepthError(
                f"camera_info {source} has {name}={f:g}: focal lengths must be within [{lo * side:g}, "
                f"{hi * side:g}] px for a {width}x{height} image (a field of view between ~0.06 and ~179 "
                "degrees); not a calibration")
    for name, c, side in (("cx", cx, width), ("cy", cy, height)):
        if abs(c - side / 2) > MAX_CENTRE_OFFSET * side:
            raise DepthError(
                f"camera_info {source} has {name}={c:g}: the principal point must lie within "
                f"{MAX_CENTRE_OFFSET:g} image sides of the image centre; not a calibration")
    return Intrinsics(fx, fy, cx, cy, width, height)


#: Focal lengths accepted, in image sides (width for fx, height for fy): a field of view from ~179 degrees
#: (0.01) down to ~0.06 degrees (1000). Beyond, the "calibration" is garbage and rays overflow float32.
FOCAL_RANGE = (0.01, 1000.0)
#: How far (in image sides) the principal point may lie from the image centre (crops move it off the image).
MAX_CENTRE_OFFSET = 10.0


def _p_set(p: Sequence[float]) -> bool:
    return len(p) == 12 and float(p[0]) > 0 and float(p[5]) > 0


def intrinsics_source(p: Sequence[float], d: Sequence[float] = ()) -> str:
    """"P" when the image counts as rectified (``P`` set and no distortion), else "K"."""
    return "P" if _p_set(p) and not any(float(v) != 0.0 for v in d) else "K"


# --- projection ------------------------------------------------------------------------------------
_RAY_CACHE: dict[Intrinsics, tuple[np.ndarray, np.ndarray]] = {}


def _rays(intr: Intrinsics) -> tuple[np.ndarray, np.ndarray]:
    """(x/z per column, y/z per row), cached per intrinsics (one camera per output: a handful of entries)."""
    rays = _RAY_CACHE.get(intr)
    if rays is None:
        xs = ((np.arange(intr.width, dtype=np.float64) - intr.cx) / intr.fx).astype(np.float32)
        ys = ((np.arange(intr.height, dtype=np.float64) - intr.cy) / intr.fy).astype(np.float32)
        if len(_RAY_CACHE) > 16:
            _RAY_CACHE.clear()
        rays = _RAY_CACHE[intr] = (xs, ys)
    return rays


def project(depth_m: np.ndarray, intr: Intrinsics, min_depth: float, max_depth: float) -> np.ndarray:
    """(H, W) metres -> (H, W, 3) float32 x y z in the optical frame; NaN outside [min_depth, max_depth].

    ``intr`` must describe ``depth_m``'s resolution (see :meth:`Intrinsics.scaled`).
    """
    h, w = depth_m.shape
    if (w, h) != (intr.width, intr.height):
        raise DepthError(f"intrinsics are for {intr.width}x{intr.height}, depth is {w}x{h}")
    xs, ys = _rays(intr)
    out = np.empty((h, w, 3), np.float32)
    z = out[..., 2]
    with np.errstate(invalid="ignore"):
        valid = (depth_m >= min_depth) & (depth_m <= max_depth)  # NaN compares False
    np.copyto(z, depth_m)
    z[~valid] = np.nan
    np.multiply(z, xs[None, :], out=out[..., 0])
    np.multiply(z, ys[:, None], out=out[..., 1])
    return out


# --- PointCloud2 layout ----------------------------------------------------------------------------
#: sensor_msgs/PointField datatype codes.
UINT16 = 4
FLOAT32 = 7


@dataclass(frozen=True)
class CloudLayout:
    """Fields of the semantic cloud: (name, byte offset, PointField datatype, count) and the point size."""

    fields: tuple[tuple[str, int, int, int], ...]
    point_step: int


def cloud_layout(rgb: bool) -> CloudLayout:
    """x y z confidence (float32), label (uint16, then 2 bytes padding), rgb (packed float32, optional).

    4-byte aligned, so every float field can be read in place.
    """
    fields = [("x", 0, FLOAT32, 1), ("y", 4, FLOAT32, 1), ("z", 8, FLOAT32, 1), ("confidence", 12, FLOAT32, 1),
              ("label", 16, UINT16, 1)]
    if rgb:
        fields.append(("rgb", 20, FLOAT32, 1))
    return CloudLayout(tuple(fields), 24 if rgb else 20)


def pack_cloud(
    points: np.ndarray,
    labels: np.ndarray,
    confidence: np.ndarray,
    rgb: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, CloudLayout]:
    """(H, W, 3) float32 points, (H, W) uint16 labels, (H, W) float32 confidence, optional (H, W, 3) uint8 RGB
    -> ((H * W * point_step,) uint8 little/native-endian buffer, layout). ``rgb`` is packed as PCL does:
    the float32 whose bits are 0x00RRGGBB."""
    h, w = labels.shape
    layout = cloud_layout(rgb is not None)
    words = layout.point_step // 4
    buf = np.empty((h * w, words), np.float32)
    buf[:, 0:3] = points.reshape(-1, 3)
    buf[:, 3] = confidence.reshape(-1)
    halves = buf.view(np.uint16)  # (N, 2 * words)
    halves[:, 8] = labels.reshape(-1)
    halves[:, 9] = 0
    if rgb is not None:
        c = rgb.reshape(-1, 3).astype(np.uint32)
        buf.view(np.uint32)[:, 5] = (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]
    return buf.reshape(-1).view(np.uint8), layout


def is_bigendian() -> bool:
    return sys.byteorder == "big"


def semantic_cloud(
    depth_m: np.ndarray,
    intr: Intrinsics,
    min_depth: float,
    max_depth: float,
    labels: np.ndarray,
    confidence: np.ndarray,
    unlabeled_id: int = 65535,
    rgb: Optional[np.ndarray] = None,
    out: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, CloudLayout]:
    """:func:`project` + :func:`pack_cloud` in one pass, written straight into the message buffer.

    ``depth_m`` (H, W) metres at the labels' resolution, ``intr`` for that resolution, ``labels`` (H, W) int32
    with -1 = unlabeled (written as ``unlabeled_id``), ``confidence`` (H, W) float32, optional (H, W, 3) uint8
    RGB. Same bytes as ``pack_cloud(project(...), ...)`` without the intermediate arrays (about half the time:
    the per-frame budget is a few milliseconds on one core).

    ``out``: a writable, C-contiguous float32 array of ``H * W * point_step / 4`` elements to write into (e.g. a
    view of the ``array('B')`` the message will carry, kept from frame to frame); the result is then a view of
    it. Reusing it matters: a fresh 6 MB buffer per 640x480 frame is returned to the OS on free and costs
    more in page faults than the arithmetic.
    """
    h, w = labels.shape
    if depth_m.shape != (h, w) or confidence.shape != (h, w):
        raise DepthError(f"depth {depth_m.shape}, labels {(h, w)} and confidence {confidence.shape} differ")
    if (w, h) != (intr.width, intr.height):
        raise DepthError(f"intrinsics are for {intr.width}x{intr.height}, labels are {w}x{h}")
    layout = cloud_layout(rgb is not None)
    shape = (h, w, layout.point_step // 4)
    if out is None:
        buf = np.empty(shape, np.float32)
    elif out.dtype != np.float32 or out.size != h * w * shape[2] or not out.flags.c_contiguous:
        raise DepthError(f"out must be a contiguous float32 array of {h * w * shape[2]} elements")
    else:
        buf = out.reshape(shape)
    z = buf[..., 2]
    np.copyto(z, depth_m)
    with np.errstate(invalid="ignore"):
        out_of_range = depth_m < min_depth
        out_of_range |= depth_m > max_depth
    z[out_of_range] = np.nan  # NaN depth stays NaN
    xs, ys = _rays(intr)
    np.multiply(z, xs[None, :], out=buf[..., 0])
    np.multiply(z, ys[:, None], out=buf[..., 1])
    np.copyto(buf[..., 3], confidence, casting="same_kind")
    halves = buf.view(np.uint16)
    label = halves[..., 8]
    np.copyto(label, labels, casting="unsafe")
    label[labels < 0] = unlabeled_id
    halves[..., 9] = 0
    if rgb is not None:
        if rgb.shape != (h, w, 3):
            raise DepthError(f"rgb {rgb.shape} does not match the labels {(h, w)}")
        # the uint32 0x00RRGGBB, written byte by byte in memory order (no uint32 temporaries)
        octets = buf.view(np.uint8)[..., 20:24]
        order = (3, 2, 1, 0) if sys.byteorder == "big" else (0, 1, 2, 3)  # memory index of B, G, R, pad
        octets[..., order[0]] = rgb[..., 2]
        octets[..., order[1]] = rgb[..., 1]
        octets[..., order[2]] = rgb[..., 0]
        octets[..., order[3]] = 0
    return buf.reshape(-1).view(np.uint8), layout
