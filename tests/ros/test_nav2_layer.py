"""Playing Nav2's semantic_segmentation_layer against the real segment_node over loopback DDS.

The node runs the model-free ``color_key`` segmenter (its output is a known function of the colours), with
``publish_points`` and ``nav2_compatible`` on. The test renders a synthetic RGB-D scene of known geometry
(camera 0.5 m above a floor, a person-sized panel at 2.1 m, a wall at 4.1 m with an unlabeled black picture),
publishes colour + registered depth at twice the colour resolution + camera_info (depth stamped 7 ms after the
colour: approximate sync), and subscribes like the layer does (ros-navigation/semantic_segmentation_layer,
``onInitialize`` / ``bufferSegmentation``): best effort depth 50 for mask, confidence and cloud, latched labels
(vision_msgs/LabelInfo when installed, else ~/vocabulary), pairing by exact stamp. It then drops each labelled
point into a 2D grid as the layer does (finite points only, distance from the sensor within
[min, max]_obstacle_distance, one observation per cell: the highest confidence, the first on ties; ids absent
from the label map skipped) and checks that the cells the geometry predicts carry the expected classes.
"""

from __future__ import annotations

import array
import math
import time
from typing import Any, Iterator

import numpy as np
import pytest
from ros_harness import NodeProcess, RosClient, latched, require_ros_or_skip, stamp_of

require_ros_or_skip()

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402

from ovseg_ros.msg import Vocabulary  # noqa: E402
from ovseg_ros.ros.messages import label_info_type  # noqa: E402
from ovseg_ros.srv import SetVocabulary  # noqa: E402

# --- the scene (camera optical frame: x right, y down, z forward) ---------------------------------------
W, H = 80, 60  # colour / label image
DW, DH = 160, 120  # registered depth image (another resolution: resampled by the node)
F_DEPTH = 100.0  # focal length at the depth resolution (50 at the colour resolution)
CAM_HEIGHT = 0.5
WALL_Z = 4.1
PERSON_Z, PERSON_HALF_WIDTH, PERSON_TOP = 2.1, 0.3, -0.7  # panel from the floor (y = 0.5) up to y = -0.7
PICTURE = (1.0, 1.6, -1.0, -0.4)  # x0, x1, y0, y1 on the wall: painted black (unlabeled)
CLASSES = ["floor", "wall", "person"]
KEYS = ["#0000ff", "#00ff00", "#ff0000"]
# The floor is painted off its key colour: lower confidence, so a cell shared with the wall or the person goes
# to them (the layer keeps the most confident observation per cell).
PAINT = {0: (20, 20, 235), 1: (0, 255, 0), 2: (255, 0, 0), -1: (0, 0, 0)}
SLOP_NS = 7_000_000
RES = 0.25  # grid cell (m)
MIN_DIST, MAX_DIST = 0.3, 5.0  # the layer's min/max_obstacle_distance defaults


def render(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast the scene at a resolution: (depth in m, class id with -1 for the picture)."""
    f = F_DEPTH * width / DW
    cx, cy = (width - 1) / 2, (height - 1) / 2
    xn = (np.arange(width) - cx)[None, :] / f * np.ones((height, 1))
    yn = (np.arange(height) - cy)[:, None] / f * np.ones((1, width))
    with np.errstate(divide="ignore"):
        z_floor = np.where(yn > 0, CAM_HEIGHT / np.where(yn > 0, yn, 1), np.inf)
    on_person = (np.abs(xn * PERSON_Z) <= PERSON_HALF_WIDTH) & (yn * PERSON_Z >= PERSON_TOP) & (
        yn * PERSON_Z <= CAM_HEIGHT)
    z_person = np.where(on_person, PERSON_Z, np.inf)
    z_wall = np.full((height, width), WALL_Z)
    stack = np.stack([z_floor, z_wall, z_person])
    cls = stack.argmin(0)
    depth = stack.min(0)
    x0, x1, y0, y1 = PICTURE
    picture = (cls == 1) & (xn * WALL_Z >= x0) & (xn * WALL_Z <= x1) & (yn * WALL_Z >= y0) & (yn * WALL_Z <= y1)
    cls = np.where(picture, -1, cls)
    return depth, cls


def expected_cells() -> dict[tuple[int, int], str | None]:
    """Cells (floor(x/RES), floor(y/RES)) in the robot frame (x forward, y left) and their class; None = the
    cell must stay empty (floor hidden behind the person)."""
    return {
        (8, 0): "person", (8, -1): "person",  # x 2.0-2.25, |y| < 0.25: the panel (and floor in front of it)
        (16, 4): "wall", (16, 5): "wall",  # x 4.0-4.25, y 1.0-1.5: wall left of the person's shadow
        (4, 0): "floor", (4, -1): "floor", (5, 1): "floor",
        (12, 0): None, (12, -1): None,  # x 3.0-3.25 straight behind the person: occluded
    }


# --- messages -------------------------------------------------------------------------------------------
def _image(arr: np.ndarray, encoding: str, stamp: tuple[int, int], frame: str) -> Image:
    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    msg.header.frame_id = frame
    msg.height, msg.width = arr.shape[:2]
    msg.encoding = encoding
    msg.step = arr.shape[1] * (arr.shape[2] if arr.ndim == 3 else 1) * arr.dtype.itemsize
    buf = array.array("B")
    buf.frombytes(np.ascontiguousarray(arr).tobytes())
    msg.data = buf
    return msg


def camera_info(stamp: tuple[int, int]) -> CameraInfo:
    msg = CameraInfo()
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    msg.header.frame_id = "camera_color_optical_frame"
    msg.width, msg.height = DW, DH
    cx, cy = (DW - 1) / 2, (DH - 1) / 2
    msg.k = [F_DEPTH, 0.0, cx, 0.0, F_DEPTH, cy, 0.0, 0.0, 1.0]
    msg.p = [F_DEPTH, 0.0, cx, 0.0, 0.0, F_DEPTH, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    msg.d = [0.0] * 5
    msg.distortion_model = "plumb_bob"
    return msg


def cloud_fields(msg: PointCloud2) -> dict[str, np.ndarray]:
    rec = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height * msg.width, msg.point_step)
    types = {7: np.float32, 4: np.uint16, 2: np.uint8}
    out = {}
    for f in msg.fields:
        dtype = np.dtype(types[f.datatype]).newbyteorder(">" if msg.is_bigendian else "<")
        out[f.name] = rec[:, f.offset:f.offset + dtype.itemsize].copy().view(dtype).reshape(msg.height, msg.width)
    return out


def mono8(msg: Image) -> np.ndarray:
    assert msg.encoding == "mono8", "Nav2's layer reads one byte per pixel"
    return np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)[:, :msg.width]


# --- the layer's part -----------------------------------------------------------------------------------
def layer_grid(mask: Image, confidence: Image, cloud: PointCloud2, class_map: dict[int, str]) -> dict:
    """One synchronised triple -> {cell: class name}, following the layer's bufferSegmentation."""
    assert mask.width * mask.height == cloud.width * cloud.height, "the layer drops clouds of another size"
    assert class_map, "the layer drops masks until a label map has arrived"
    labels, conf = mono8(mask), mono8(confidence)
    f = cloud_fields(cloud)
    # TF from the optical frame to the robot frame (x forward, y left, z up), camera CAM_HEIGHT above the floor
    xs, ys, zs = f["z"], -f["x"], -f["y"] + CAM_HEIGHT
    best: dict[tuple[int, int], int] = {}
    flat_conf = conf.reshape(-1)
    for idx, (x, y, z) in enumerate(zip(xs.reshape(-1), ys.reshape(-1), zs.reshape(-1))):
        if not math.isfinite(z):
            continue
        sq = x * x + y * y + (z - CAM_HEIGHT) ** 2
        if sq >= MAX_DIST ** 2 or sq <= MIN_DIST ** 2:
            continue
        cell = (math.floor(x / RES), math.floor(y / RES))
        if cell not in best or flat_conf[idx] > flat_conf[best[cell]]:
            best[cell] = idx
    flat_labels = labels.reshape(-1)
    return {cell: class_map[int(flat_labels[i])] for cell, i in best.items() if int(flat_labels[i]) in class_map}


# --- the test -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def node(client: RosClient, namespace: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    params = {
        "segmenter": "color_key",
        "segmenter_options": "{colors: [" + ", ".join(f"'{c}'" for c in KEYS) + "], max_distance: 40.0}",
        "vocabulary": CLASSES,
        "device": "cpu",
        "cache_dir": "",
        "publish_panoptic": False,
        "publish_points": True,
        "nav2_compatible": True,
        "min_depth": 0.2,
        "max_depth": 10.0,
        "depth_slop": 0.05,
        "diagnostics_period": 0.5,
    }
    proc = NodeProcess(namespace, params, tmp_path_factory.mktemp("nav2_node"))
    try:
        assert proc.wait_for_log("active:", timeout=90), proc.output()[-3000:]
        yield proc
    finally:
        proc.stop()


def test_nav2_layer_sees_the_expected_cells(node: NodeProcess, client: RosClient, namespace: str) -> None:
    fqn = node.fqn
    sensor = QoSProfile(depth=50, reliability=ReliabilityPolicy.BEST_EFFORT, history=HistoryPolicy.KEEP_LAST)
    diagnostics = client.subscribe("/diagnostics", DiagnosticArray)
    masks = client.subscribe(f"{fqn}/semantic/labels", Image, sensor)
    confs = client.subscribe(f"{fqn}/semantic/confidence", Image, sensor)
    clouds = client.subscribe(f"{fqn}/semantic/points", PointCloud2, sensor)
    label_info_cls = label_info_type()
    if label_info_cls is not None:
        labels_col = client.subscribe(f"{fqn}/label_info", label_info_cls, latched())
    else:  # vision_msgs not installed: the same id -> name map from ~/vocabulary
        labels_col = client.subscribe(f"{fqn}/vocabulary", Vocabulary, latched())
    color_pub = client.publisher(f"{namespace}/image", Image)
    depth_pub = client.publisher(f"{namespace}/depth/image", Image)
    info_pub = client.publisher(f"{namespace}/depth/camera_info", CameraInfo)

    depth_m, _ = render(DW, DH)
    depth_mm = np.rint(depth_m * 1000).astype(np.uint16)
    _, cls = render(W, H)
    rgb = np.zeros((H, W, 3), np.uint8)
    for c, colour in PAINT.items():
        rgb[cls == c] = colour

    triples: dict[tuple[int, int], dict[str, Any]] = {}
    deadline = time.monotonic() + 60.0
    i = 0
    while time.monotonic() < deadline:
        i += 1
        stamp = (2_000_000 + i, 100_000_000)
        dstamp = (stamp[0], stamp[1] + SLOP_NS)
        info_pub.publish(camera_info(dstamp))
        depth_pub.publish(_image(depth_mm, "16UC1", dstamp, "camera_color_optical_frame"))
        color_pub.publish(_image(rgb, "rgb8", stamp, "camera_color_optical_frame"))
        time.sleep(0.3)
        for col, key in ((masks, "mask"), (confs, "confidence"), (clouds, "cloud")):
            for m in col.snapshot():
                triples.setdefault(stamp_of(m.header), {})[key] = m
        complete = [t for t in triples.values() if len(t) == 3]
        if len(complete) >= 3:
            break
    complete = {s: t for s, t in triples.items() if len(t) == 3}
    assert len(complete) >= 3, f"{len(complete)} complete triples; node log:\n{node.output()[-3000:]}"

    label_msg = labels_col.wait_for(timeout=10)
    assert label_msg is not None, "no latched label map"
    if label_info_cls is not None:
        class_map = {int(c.class_id): c.class_name for c in label_msg.class_map}
    else:
        class_map = {int(c.id): c.name for c in label_msg.classes}
        assert label_msg.label_encoding == "mono8" and label_msg.unlabeled_id == 255
    assert class_map == dict(enumerate(CLASSES))

    expected = expected_cells()
    for stamp, t in complete.items():
        mask, conf, cloud = t["mask"], t["confidence"], t["cloud"]
        assert cloud.header.frame_id == mask.header.frame_id == "camera_color_optical_frame"
        assert (cloud.width, cloud.height) == (mask.width, mask.height) == (W, H)
        f = cloud_fields(cloud)
        labels = mono8(mask)
        np.testing.assert_array_equal(f["label"], labels)  # pixel-aligned, same ids, 255 = unlabeled
        assert set(np.unique(labels)) <= set(class_map) | {255} and 255 in labels
        assert np.abs(f["confidence"] * 255 - mono8(conf)).max() <= 0.51
        # known geometry: every labelled pixel away from the class edges has the scene's depth
        interior = (cls == np.roll(cls, 1, 0)) & (cls == np.roll(cls, -1, 0)) & (cls == np.roll(cls, 1, 1)) & (
            cls == np.roll(cls, -1, 1))
        for c, z in ((1, WALL_Z), (2, PERSON_Z)):
            sel = interior & (cls == c)
            assert sel.sum() > 20
            np.testing.assert_allclose(f["z"][sel], z, atol=1e-4)
            assert (labels[sel] == c).all()
        grid = layer_grid(mask, conf, cloud, class_map)
        got = {cell: grid.get(cell) for cell in expected}
        assert got == expected, f"stamp {stamp}: {got}"
        assert "person" not in {grid.get((16, j)) for j in range(-8, 8)}  # nothing at the wall's distance

    def counted(msg: DiagnosticArray) -> bool:
        return any(fqn in st.name and int({v.key: v.value for v in st.values}.get("points_matched", "0")) >= 3
                   for st in msg.status)

    diag = diagnostics.wait_for(counted, timeout=10)
    assert diag is not None, "the node's diagnostics must count the matched depth images"
    values = {v.key: v.value for st in diag.status if fqn in st.name for v in st.values}
    assert values["camera_info"] == f"{DW}x{DH} (P)", values
    # the only refusal possible here: a first depth image paired before the first camera_info got through
    assert values["depth_refused"] == "0" or "camera_info" in values["depth_last_refusal"], values


def test_nav2_mode_refuses_more_than_255_classes(node: NodeProcess, client: RosClient) -> None:
    req = SetVocabulary.Request()
    req.classes = [f"thing {i}" for i in range(256)]
    resp = client.call(SetVocabulary, f"{node.fqn}/set_vocabulary", req, timeout=60)
    assert not resp.success and "nav2_compatible" in resp.message and "one byte per pixel" in resp.message
    req.classes = CLASSES
    assert client.call(SetVocabulary, f"{node.fqn}/set_vocabulary", req, timeout=60).success
    assert node.alive()


def test_nav2_params_from_the_running_node(node: NodeProcess, capsys: pytest.CaptureFixture) -> None:
    import yaml

    from ovseg_ros.tools import nav2_params

    assert nav2_params.main(["--node", node.fqn, "--cost", "person=lethal", "--cost", "floor=free"]) == 0
    block = yaml.safe_load(capsys.readouterr().out)["semantic_layer"]
    src = block[block["observation_sources"]]
    assert [src[t]["classes"][0] for t in src["class_types"]] == CLASSES
    assert src["pointcloud_topic"] == f"{node.fqn}/semantic/points"
    assert src["labels_topic"] == f"{node.fqn}/label_info"
    assert src["person"]["max_cost"] == 254 and src["floor"]["max_cost"] == 0
    assert nav2_params.main(["--node", node.fqn + "_absent", "--timeout", "1"]) == 2
    assert "not available" in capsys.readouterr().err


def test_bad_depth_through_the_node_is_refused_and_it_keeps_serving(node: NodeProcess, client: RosClient,
                                                                    namespace: str) -> None:
    fqn = node.fqn
    diagnostics = client.subscribe("/diagnostics", DiagnosticArray)
    clouds = client.subscribe(f"{fqn}/semantic/points", PointCloud2)
    color_pub = client.publisher(f"{namespace}/image", Image)
    depth_pub = client.publisher(f"{namespace}/depth/image", Image)
    info_pub = client.publisher(f"{namespace}/depth/camera_info", CameraInfo)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, :] = PAINT[1]
    bad = [
        _image(np.zeros((DH, DW, 3), np.uint8), "rgb8", (0, 0), "camera_color_optical_frame"),  # not depth
        _image(np.full((DH, 3 * DW), 1000, np.uint16), "16UC1", (0, 0), "camera_color_optical_frame"),  # aspect
    ]

    def refusal(reason: str) -> Any:
        def match(msg: DiagnosticArray) -> bool:
            return any(fqn in st.name and reason in {v.key: v.value for v in st.values}.get("depth_last_refusal", "")
                       for st in msg.status)
        return match

    for k, (msg, reason) in enumerate(zip(bad, ["unsupported depth encoding 'rgb8'", "registered"])):
        hit = None
        deadline = time.monotonic() + 20
        while hit is None and time.monotonic() < deadline:
            stamp = (3_000_000 + 100 * k, int(time.monotonic() * 1e3) % 1000 * 1_000_000)
            info_pub.publish(camera_info(stamp))
            msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
            depth_pub.publish(msg)
            color_pub.publish(_image(rgb, "rgb8", stamp, "camera_color_optical_frame"))
            hit = diagnostics.wait_for(refusal(reason), timeout=0.6, new_only=True)
        assert hit is not None, f"no refusal {reason!r}; node log:\n{node.output()[-2000:]}"
        assert node.alive()
    # still serving: a good depth image gives a cloud
    depth_mm = np.full((DH, DW), 3000, np.uint16)
    got = None
    deadline = time.monotonic() + 20
    i = 0
    while got is None and time.monotonic() < deadline:
        i += 1
        stamp = (4_000_000 + i, 0)
        info_pub.publish(camera_info(stamp))
        depth_pub.publish(_image(depth_mm, "16UC1", stamp, "camera_color_optical_frame"))
        color_pub.publish(_image(rgb, "rgb8", stamp, "camera_color_optical_frame"))
        got = clouds.wait_for(lambda m: m.header.stamp.sec >= 4_000_000, timeout=0.5)
    assert got is not None
    np.testing.assert_allclose(cloud_fields(got)["z"], 3.0)
