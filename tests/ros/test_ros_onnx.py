"""segment_node with ``backend:=onnxruntime`` (CPU execution provider, dense_clip on the tiny model): its label
images equal the torch backend's, before and after a ``~/set_vocabulary`` on the running node (the exported
graph is vocabulary-free, nothing is re-exported), and a mismatched file fails configure with the reason.
color_key has no model to export, so dense_clip is the method here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from ros_harness import RosClient, active_inprocess_node, image_array, make_image, publish_until, \
    require_ros_or_skip, stamp_of

require_ros_or_skip()

from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from ovseg_ros.msg import SegmentationInfo  # noqa: E402
from ovseg_ros.ros.params import NodeConfig  # noqa: E402
from ovseg_ros.ros.segment_node import SegmentNode  # noqa: E402
from ovseg_ros.srv import SetVocabulary  # noqa: E402

LABEL_AGREEMENT = 0.999
NEW_CLASSES = ["cup", "bottle, flask", "wall", "dog", "car"]


@pytest.fixture(scope="module")
def onnx_params(fast_params: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from ovseg_ros.core.deploy import export_onnx
    from ovseg_ros.core.segmenter import build_segmenter

    cfg = NodeConfig.from_values(fast_params)
    seg = build_segmenter("dense_clip", cfg.resolved_preset(), cfg.segmenter_overrides(), "cpu")
    path = tmp_path_factory.mktemp("onnx") / "dense_clip.onnx"
    export_onnx(seg, path, preset=cfg.resolved_preset())
    return {**fast_params, "backend": "onnxruntime", "onnx_file": str(path), "onnx_providers": ["cpu"]}


@pytest.fixture(scope="module")
def torch_segmenter(fast_params: dict) -> Any:
    from ovseg_ros.core.segmenter import build_segmenter

    cfg = NodeConfig.from_values(fast_params)
    return build_segmenter("dense_clip", cfg.resolved_preset(), cfg.segmenter_overrides(), "cpu")


@pytest.fixture(scope="module")
def node(ros_session: None, onnx_params: dict, namespace: str) -> Iterator[SegmentNode]:
    with active_inprocess_node(namespace, onnx_params) as n:
        yield n


def _labels_for_revision(client: RosClient, namespace: str, fqn: str, revision: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Publish one frame (repeated until seen) and return (the frame, its labels) computed with ``revision``."""
    labels = client.subscribe(f"{fqn}/semantic/labels", Image)
    info = client.subscribe(f"{fqn}/info", SegmentationInfo)
    pub = client.publisher(f"{namespace}/image", Image)
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    frame[:24, :32] = (200, 40, 40)

    def msg(i: int) -> Any:
        return make_image(64, 48, stamp=(1000 + seed, i), data=frame.tobytes())

    def done(_m: Any, sent: list) -> bool:
        stamps = {stamp_of(i.header) for i in info.snapshot() if i.vocabulary_revision == revision}
        return any(stamp_of(m.header) in stamps for m in labels.snapshot())

    found, _ = publish_until(pub, msg, labels, done, timeout=60.0)
    assert found is not None, f"no labels of revision {revision}"
    stamps = {stamp_of(i.header) for i in info.snapshot() if i.vocabulary_revision == revision}
    out = next(m for m in labels.snapshot() if stamp_of(m.header) in stamps)
    client.unsubscribe(labels)
    client.unsubscribe(info)
    return frame, image_array(out)


def _torch_labels(seg: Any, frame: np.ndarray, classes: list[str], ids: list[int]) -> np.ndarray:
    """The torch backend's labels for ``frame`` in the node's wire ids (``ids``: the stable id of each class)."""
    from ovseg_ros.core.vocabulary import Vocabulary

    lab = seg.segment(frame, seg.encode_vocabulary(Vocabulary.from_request(classes))).labels
    lut = np.asarray(list(ids) + [255], dtype=np.uint8)  # position -> id; UNLABELED (-1) -> 255
    return lut[np.where(lab < 0, len(ids), lab)]


def test_onnx_node_equals_torch_before_and_after_vocabulary_change(
        node: SegmentNode, client: RosClient, namespace: str, fast_params: dict, torch_segmenter: Any) -> None:
    fqn = node.get_fully_qualified_name()
    assert node.get_parameter("backend").value == "onnxruntime"
    rev0 = client.call(SetVocabulary, f"{fqn}/set_vocabulary",
                       SetVocabulary.Request(classes=list(fast_params["vocabulary"])), timeout=60.0)
    assert rev0.success, rev0.message
    frame, got = _labels_for_revision(client, namespace, fqn, rev0.revision, seed=1)
    ids0 = list(rev0.class_ids)
    assert (got == _torch_labels(torch_segmenter, frame, list(fast_params["vocabulary"]), ids0)).mean() \
        >= LABEL_AGREEMENT
    resp = client.call(SetVocabulary, f"{fqn}/set_vocabulary", SetVocabulary.Request(classes=NEW_CLASSES),
                       timeout=60.0)
    assert resp.success and resp.revision > rev0.revision, resp.message
    frame, got = _labels_for_revision(client, namespace, fqn, resp.revision, seed=2)
    assert (got == _torch_labels(torch_segmenter, frame, NEW_CLASSES, list(resp.class_ids))).mean() >= LABEL_AGREEMENT


def test_mismatched_file_fails_configure_with_reason(ros_session: None, onnx_params: dict, tmp_path: Path) -> None:
    from rclpy.lifecycle import TransitionCallbackReturn

    from ovseg_ros.core.models import save_random_checkpoint

    other = save_random_checkpoint("ovseg-tiny-vit", tmp_path / "other.pt", seed=7)
    params = {**onnx_params, "checkpoint": str(other), "autostart": False}
    n = SegmentNode(namespace=f"/ovseg_onnx_bad_{id(tmp_path)}",
                    parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    try:
        assert n.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert "weights_sha256" in n._last_transition_error and "export it from" in n._last_transition_error
    finally:
        n.destroy_node()
