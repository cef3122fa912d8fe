"""Parameter types and derived names (issue 17 item 5, defect 7): an integer for a double parameter is
accepted - in a params file (``max_depth: 10``) and through SetParameters (``ros2 param set ... depth_slop 0``,
which rclpy refused with "expected '3' got '2'") - and a camera name whose topics would exceed ROS's limit is
refused by validation with the reason, not half-way through configure."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml
from ros_harness import require_ros_or_skip

require_ros_or_skip()

import rclpy  # noqa: E402
from rcl_interfaces.msg import Parameter as ParameterMsg  # noqa: E402
from rcl_interfaces.msg import ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from ovseg_ros.ros.params import MAX_TOPIC_CHARS, NODE_NAME_KEY, NodeConfig, current_values, validate  # noqa: E402
from ovseg_ros.ros.segment_node import SegmentNode  # noqa: E402


def _node_with_params_file(tmp_path: Path, params: dict, name: str) -> SegmentNode:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    return SegmentNode(name, cli_args=["--ros-args", "--params-file", str(path)])


def test_integer_for_a_double_in_a_params_file(ros_session: None, tmp_path: Path) -> None:
    node = _node_with_params_file(tmp_path, {"max_depth": 10, "depth_slop": 0, "min_depth": 1}, "int_params")
    try:
        assert node._param_errors == {}  # noqa: SLF001  (configure would fail with these)
        values = current_values(node)
        assert values["max_depth"] == 10.0 and isinstance(values["max_depth"], float)
        assert values["depth_slop"] == 0.0 and values["min_depth"] == 1.0
        cfg = NodeConfig.from_values(values)
        assert isinstance(cfg.max_depth, float) and cfg.max_depth == 10.0
    finally:
        node.destroy_node()


def test_out_of_range_integer_in_a_params_file_is_still_refused(ros_session: None, tmp_path: Path) -> None:
    node = _node_with_params_file(tmp_path, {"depth_slop": 11}, "int_params_bad")
    try:
        assert "depth_slop" in node._param_errors  # noqa: SLF001
    finally:
        node.destroy_node()


def _set(client: rclpy.node.Node, fqn: str, name: str, value: ParameterValue) -> tuple[bool, str]:
    cli = client.create_client(SetParameters, f"{fqn}/set_parameters")
    try:
        assert cli.wait_for_service(timeout_sec=10.0)
        future = cli.call_async(SetParameters.Request(parameters=[ParameterMsg(name=name, value=value)]))
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        assert done.wait(10.0)
        result = future.result().results[0]
        return result.successful, result.reason
    finally:
        client.destroy_client(cli)


def test_integer_for_a_double_through_set_parameters(ros_session: None) -> None:
    node = SegmentNode("int_set_params")
    client = rclpy.create_node("int_set_params_client")
    ex = SingleThreadedExecutor()
    ex.add_node(node)
    ex.add_node(client)
    thread = threading.Thread(target=ex.spin, daemon=True)
    thread.start()
    try:
        fqn = node.get_fully_qualified_name()
        ok, why = _set(client, fqn, "depth_slop", ParameterValue(type=ParameterType.PARAMETER_INTEGER,
                                                                  integer_value=0))
        assert ok, why
        value = node.get_parameter("depth_slop").value
        assert value == 0.0 and isinstance(value, float)
        ok, why = _set(client, fqn, "max_depth", ParameterValue(type=ParameterType.PARAMETER_INTEGER,
                                                                integer_value=20))
        assert ok and node.get_parameter("max_depth").value == 20.0, why
        # still validated: out of range, and a string stays refused
        ok, why = _set(client, fqn, "depth_slop", ParameterValue(type=ParameterType.PARAMETER_INTEGER,
                                                                  integer_value=100))
        assert not ok and "depth_slop" in why
        ok, _ = _set(client, fqn, "depth_slop", ParameterValue(type=ParameterType.PARAMETER_STRING,
                                                               string_value="0"))
        assert not ok and node.get_parameter("depth_slop").value == 0.0
    finally:
        ex.shutdown(timeout_sec=2.0)
        node.destroy_node()
        client.destroy_node()
        thread.join(5.0)


def test_ros_topic_limit_is_the_one_checked(ros_session: None) -> None:
    """The bound used by validation is rmw's: the longest allowed topic is accepted, one more refused."""
    node = rclpy.create_node("topic_limit")
    try:
        node.destroy_publisher(node.create_publisher(Image, "/" + "a" * (MAX_TOPIC_CHARS - 1), 1))
        with pytest.raises(Exception):  # noqa: B017  (rclpy raises InvalidTopicNameException or RCLError)
            node.create_publisher(Image, "/" + "a" * MAX_TOPIC_CHARS, 1)
    finally:
        node.destroy_node()


@pytest.mark.parametrize("length,ok", [(200, True), (230, False)])
def test_long_camera_name_refused_by_validation(length: int, ok: bool) -> None:
    name = "c" * length
    values = {NODE_NAME_KEY: "/robot/segment_node"}
    why = validate("cameras", [name], values)
    if ok:
        assert why is None
    else:
        assert why is not None and "too long" in why and str(MAX_TOPIC_CHARS) in why


def test_long_camera_name_fails_configure_cleanly(ros_session: None, tmp_path: Path) -> None:
    """Through the node: configure answers FAILURE with the reason before creating anything."""
    from rclpy.lifecycle import TransitionCallbackReturn

    node = _node_with_params_file(tmp_path, {"cameras": ["c" * 230], "segmenter": "color_key",
                                             "vocabulary": ["a"], "device": "cpu", "cache_dir": ""}, "long_cam")
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert "too long" in node._last_transition_error  # noqa: SLF001
        assert node.cameras == []
    finally:
        node.destroy_node()
