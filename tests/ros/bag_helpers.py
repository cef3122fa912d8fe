"""Synthetic RGB-D recordings for the ovseg-bag tests: rosbag2 bags (sqlite3 or MCAP) written with rosbags,
messages built and serialized with rclpy (as a recorder stores them)."""

from __future__ import annotations

import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = ["floor", "wall", "person", "chair"]
COLOR = "/cam/color/image_raw"
COMPRESSED = "/cam/color/image_raw/compressed"
DEPTH = "/cam/depth/image_rect_raw"
INFO = "/cam/depth/camera_info"
OTHER = "/tf_like/chatter"
T0 = 1_700_000_000 * 10**9  # first stamp (ns)
PERIOD = 100_000_000  # 10 Hz


@dataclass(frozen=True)
class Recording:
    path: Path
    frames: int
    stamps: list[int]  # colour stamps, ns
    log_times: list[int]


def frame_image(i: int, w: int = 32, h: int = 24) -> np.ndarray:
    """Key-colour regions that move with ``i`` (color_key labels them by nearest key colour)."""
    from ovseg_ros.core.segmenters.color_key import key_colors

    keys = key_colors(len(VOCAB))
    img = np.empty((h, w, 3), np.uint8)
    img[:] = keys[0]
    img[: h // 3] = keys[1]
    x = (3 * i) % (w - 8)
    img[h // 2:, x: x + 8] = keys[2 + i % 2]
    img[0, 0] = (7, 200, 99)  # far from every key colour: unlabeled
    return img


def _header(msg: Any, stamp: int, frame: str) -> None:
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 10**9)
    msg.header.frame_id = frame


def _bytes(data: bytes) -> array.array:
    buf = array.array("B")
    buf.frombytes(data)
    return buf


def write_rgbd_bag(path: Path, storage: str, frames: int = 8, compressed: bool = False, depth: bool = True,
                   w: int = 32, h: int = 24, both: bool = False) -> Recording:
    """A bag of ``frames`` colour frames at 10 Hz (raw, or PNG compressed; ``both``: raw on COLOR and the same
    frames compressed on COMPRESSED, as two cameras), depth 16UC1 2 ms after each colour frame, a camera_info
    at the start, and an unrelated String topic."""
    import cv2
    from rclpy.serialization import serialize_message
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image
    from std_msgs.msg import String

    store = get_typestore(Stores.ROS2_KILTED)
    plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
    stamps, logs = [], []
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        color_topic = COMPRESSED if compressed else COLOR
        color_type = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
        c_color = writer.add_connection(color_topic, color_type, typestore=store)
        c_second = (writer.add_connection(COMPRESSED, "sensor_msgs/msg/CompressedImage", typestore=store)
                    if both else None)
        c_depth = writer.add_connection(DEPTH, "sensor_msgs/msg/Image", typestore=store) if depth else None
        c_info = writer.add_connection(INFO, "sensor_msgs/msg/CameraInfo", typestore=store) if depth else None
        c_other = writer.add_connection(OTHER, "std_msgs/msg/String", typestore=store)
        if depth:
            info = CameraInfo()
            _header(info, T0 - 50_000_000, "cam_color_optical")
            info.width, info.height = w, h
            info.k = [20.0, 0.0, w / 2, 0.0, 20.0, h / 2, 0.0, 0.0, 1.0]
            info.p = [20.0, 0.0, w / 2, 0.0, 0.0, 20.0, h / 2, 0.0, 0.0, 0.0, 1.0, 0.0]
            info.distortion_model = "plumb_bob"
            info.d = [0.0] * 5
            writer.write(c_info, T0 - 40_000_000, serialize_message(info))
        for i in range(frames):
            stamp = T0 + i * PERIOD
            log_time = stamp + 3_000_000  # recorded 3 ms after capture
            rgb = frame_image(i, w, h)
            png_msg = CompressedImage()
            png_msg.format = "rgb8; png compressed bgr8"
            ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            assert ok
            png_msg.data = _bytes(png.tobytes())
            _header(png_msg, stamp, "cam_color_optical")
            raw_msg = Image()
            raw_msg.width, raw_msg.height, raw_msg.encoding, raw_msg.step = w, h, "rgb8", 3 * w
            raw_msg.data = _bytes(rgb.tobytes())
            _header(raw_msg, stamp, "cam_color_optical")
            writer.write(c_color, log_time, serialize_message(png_msg if compressed else raw_msg))
            if c_second is not None:
                writer.write(c_second, log_time, serialize_message(png_msg))
            stamps.append(stamp)
            logs.append(log_time)
            if depth:
                d = Image()
                _header(d, stamp + 2_000_000, "cam_color_optical")
                mm = np.full((h, w), 1000 + 100 * i, np.uint16)
                mm[0, :] = 0  # invalid depth row
                d.width, d.height, d.encoding, d.step = w, h, "16UC1", 2 * w
                d.data = _bytes(mm.tobytes())
                writer.write(c_depth, log_time + 2_000_000, serialize_message(d))
            if i % 3 == 0:
                writer.write(c_other, log_time + 1, serialize_message(String(data=f"tick {i}")))
    return Recording(path, frames, stamps, logs)


def read_bag(path: Path) -> dict[str, list[tuple[int, bytes]]]:
    """{topic: [(log time, raw CDR), ...]} of a bag, in the bag's order."""
    from rosbags.rosbag2 import Reader

    out: dict[str, list[tuple[int, bytes]]] = {}
    with Reader(path) as reader:
        for conn in reader.connections:
            out.setdefault(conn.topic, [])
        for conn, t, raw in reader.messages():
            out[conn.topic].append((t, bytes(raw)))
    return out


def read_order(path: Path) -> list[tuple[str, int, bytes]]:
    from rosbags.rosbag2 import Reader

    with Reader(path) as reader:
        return [(c.topic, t, bytes(raw)) for c, t, raw in reader.messages()]
