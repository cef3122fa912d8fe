"""Control characters in anything the node logs (issue 17 item 5, defect 7): ANSI escapes in class names
reached the operator's terminal raw (``\\x1b[2J`` clears it). Names with control characters are refused;
every other untrusted text (frame ids, encodings, reasons, parameter values) is escaped by one function,
``guard.sanitize``, on every logging path - checked end to end on the node's whole output."""

from __future__ import annotations

import array
import time
from typing import Any, Iterator

import pytest
from ros_harness import NodeProcess, RosClient, require_ros_or_skip

require_ros_or_skip()

from rcl_interfaces.msg import Parameter as ParameterMsg  # noqa: E402
from rcl_interfaces.msg import ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from ovseg_ros.core.vocabulary import Vocabulary, VocabularyError, check_query_texts  # noqa: E402
from ovseg_ros.ros.diagnostics import make_status  # noqa: E402
from ovseg_ros.ros.guard import reason, sanitize  # noqa: E402
from ovseg_ros.ros.params import validate  # noqa: E402
from ovseg_ros.srv import Query, SetVocabulary  # noqa: E402

ANSI = "\x1b[2J\x1b]0;pwned\x07"


@pytest.mark.parametrize("text,expected", [
    ("\x1b[2Jchair", "\\x1b[2Jchair"),
    ("a\nforged log line", "a\\nforged log line"),
    ("evil\u202etxt.exe", "evil\\u202etxt.exe"),
    ("caf\u00e9 \u4e2d\u6587 - ok", "caf\u00e9 \u4e2d\u6587 - ok"),
    ("\x9b31m", "\\x9b31m"),
])
def test_sanitize(text: str, expected: str) -> None:
    assert sanitize(text) == expected


def test_reason_and_status_are_escaped() -> None:
    assert "\x1b" not in reason(ValueError(ANSI + "boom"))
    status = make_status("n" + ANSI, ANSI, 0, ANSI, {"last_refusal_reason": ANSI})
    texts = [status.name, status.hardware_id, status.message] + [kv.value for kv in status.values]
    assert not any("\x1b" in t or "\x07" in t for t in texts)


def test_control_characters_in_names_and_queries_are_refused() -> None:
    for bad in (ANSI + "chair", "ch\tair", "ch\x7fair", "chair, \x1b[31mseat"):
        with pytest.raises(VocabularyError, match="control characters"):
            Vocabulary.from_request([bad])
        with pytest.raises(VocabularyError, match="control characters"):
            check_query_texts([bad])
    assert Vocabulary.from_request(["caf\u00e9", "\u4e2d\u6587"]).names == ["caf\u00e9", "\u4e2d\u6587"]


def test_parameter_reasons_are_escaped() -> None:
    for name, value in (("vocabulary", [ANSI]), ("cameras", [ANSI]), ("device", ANSI),
                        ("segmenter_options", "{" + ANSI + ": 1}"), ("vocabulary_file", "/x/" + ANSI)):
        why = validate(name, value, {"segmenter": "dense_clip"})
        assert why is not None and "\x1b" not in why and "\x07" not in why, (name, why)


# --- end to end: the node's whole output holds no control byte --------------------------------------------
@pytest.fixture(scope="module")
def node(client: RosClient, namespace: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    params = {"segmenter": "color_key", "segmenter_options": "{colors: ['#0000ff', '#00ff00']}",
              "vocabulary": ["floor", "wall"], "device": "cpu", "cache_dir": "", "publish_points": True,
              "diagnostics_period": 0.5}
    proc = NodeProcess(namespace, params, tmp_path_factory.mktemp("ansi_node"))
    try:
        assert proc.wait_for_log("active:", timeout=90), proc.output()[-3000:]
        yield proc
    finally:
        proc.stop()


def _image(encoding: str, frame_id: str, width: int = 8, height: int = 6, step: int = 24) -> Image:
    msg = Image()
    msg.header.frame_id = frame_id
    msg.header.stamp.sec = 7
    msg.width, msg.height, msg.encoding, msg.step = width, height, encoding, step
    msg.data = array.array("B", bytes(step * height))
    return msg


def test_node_output_has_no_control_bytes(node: NodeProcess, client: RosClient, namespace: str) -> None:
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    img = client.publisher(f"{namespace}/image", Image, qos)
    depth = client.publisher(f"{namespace}/depth/image", Image, qos)
    info = client.publisher(f"{namespace}/depth/camera_info", CameraInfo, qos)
    bad_info = CameraInfo()
    bad_info.header.frame_id, bad_info.width, bad_info.height = ANSI, 8, 6
    bad_info.k = [1e-300, 0.0, 4.0, 0.0, 1e-300, 3.0, 0.0, 0.0, 1.0]
    for _ in range(10):  # repeated: discovery, and the logs are throttled per call site
        img.publish(_image(ANSI, ANSI))
        img.publish(_image("rgb8", ANSI, step=7))
        depth.publish(_image(ANSI + "16UC1", ANSI))
        info.publish(bad_info)
        time.sleep(0.2)
    resp = client.call(SetVocabulary, f"{node.fqn}/set_vocabulary",
                       SetVocabulary.Request(classes=[ANSI + "chair", "table"]), 30.0)
    assert not resp.success and "\x1b" not in resp.message
    resp = client.call(SetVocabulary, f"{node.fqn}/set_vocabulary",
                       SetVocabulary.Request(classes=["chair\u202e", "table"]), 60.0)  # accepted, escaped in logs
    resp = client.call(Query, f"{node.fqn}/query", Query.Request(texts=[ANSI]), 30.0)
    req = SetParameters.Request(parameters=[ParameterMsg(name="device", value=ParameterValue(
        type=ParameterType.PARAMETER_STRING, string_value=ANSI))])
    result: Any = client.call(SetParameters, f"{node.fqn}/set_parameters", req, 30.0).results[0]
    assert not result.successful and "\x1b" not in result.reason
    time.sleep(1.0)
    log = node.log_path.read_bytes()
    assert b"refused" in log, log[-2000:]
    for byte in (b"\x1b", b"\x07", "\u202e".encode()):
        assert byte not in log, log[max(0, log.find(byte) - 300): log.find(byte) + 100]


def test_python_logging_of_the_core_is_escaped(ros_session: None) -> None:
    """The core logs through Python's ``logging`` (LLM endpoint errors quote the server's text): the node
    installs the same escaping there."""
    import logging

    from ovseg_ros.ros.segment_node import SegmentNode

    node = SegmentNode("sanitize_logging")
    try:
        assert any(type(f).__name__ == "_SanitizingFilter" for f in logging.lastResort.filters)
        record = logging.LogRecord("ovseg_ros.core.llm_text", logging.WARNING, __file__, 1,
                                   "LLM endpoint failed (%s)", (ANSI,), None)
        for f in logging.lastResort.filters:
            f.filter(record)
        assert "\x1b" not in record.getMessage() and "\\x1b[2J" in record.getMessage()
    finally:
        node.destroy_node()
