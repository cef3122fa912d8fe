"""Launch segment_node on a camera topic.

    ros2 launch ovseg_ros segment.launch.py image:=/camera/color/image_raw vocabulary:=outdoor_driving

Parameters come from ``params_file`` (default: config/segment_node.yaml); arguments given here override
it. Outputs are private to the node (``<namespace>/<node_name>/semantic/labels`` etc.); one node per
camera, each in its own namespace. The node configures and activates itself (``autostart``); under
nav2_lifecycle_manager set ``autostart:=false`` in the params file and ``bond_timeout: 0.0`` in the
manager (an rclpy node has no bond).

    ros2 launch ovseg_ros segment.launch.py image:=/camera/color/image_raw \
        depth:=/camera/aligned_depth_to_color/image_raw nav2_compatible:=true rviz:=true

``depth:=`` (registered to the colour camera) turns on ``~/semantic/points``; its camera_info defaults to the
sibling ``camera_info`` topic. ``rviz:=true`` starts rviz2 with config/ovseg.rviz when rviz2 is installed.

    ros2 bag play my_bag --clock --loop &
    ros2 launch ovseg_ros segment.launch.py image:=/camera/color/image_raw use_sim_time:=true

``use_sim_time:=true`` makes the node (and rviz2) follow ``/clock``: latency is then in simulated seconds,
``/diagnostics`` keeps coming while the clock is paused, and a jump back (a loop, a simulator reset) clears the
depth matching (see ovseg_ros/ros/clock.py).
"""

from __future__ import annotations

import os
import re
import shutil

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

SEGMENTERS = ["dense_clip", "itaclip", "clip_es", "car", "fcclip", "color_key"]
DEVICE_RE = re.compile(r"^(|auto|cpu|cuda(:\d+)?)$")
BOOL_OR_KEEP = ["", "true", "false"]


def _arguments() -> list[DeclareLaunchArgument]:
    share = FindPackageShare("ovseg_ros")
    return [
        DeclareLaunchArgument("image", default_value="image",
                              description="Input sensor_msgs/Image topic (remaps the node's 'image'); with "
                                          "use_compressed, '<image>/compressed' is subscribed too."),
        DeclareLaunchArgument("use_compressed", default_value="false", choices=["true", "false"],
                              description="Also subscribe sensor_msgs/CompressedImage on '<image>/compressed'."),
        DeclareLaunchArgument("image_reliability", default_value="best_effort",
                              choices=["best_effort", "reliable"],
                              description="Reliability of the camera subscription (match the camera driver)."),
        DeclareLaunchArgument("segmenter", default_value="", choices=[""] + SEGMENTERS,
                              description="Segmentation method; empty keeps the params file's."),
        DeclareLaunchArgument("preset", default_value="",
                              description="Segmenter preset (e.g. realtime, default); empty keeps the params file's."),
        DeclareLaunchArgument("model", default_value="",
                              description="open_clip architecture overriding the preset's (e.g. ViT-B-16-quickgelu)."),
        DeclareLaunchArgument("pretrained", default_value="",
                              description="open_clip pretrained tag overriding the preset's (e.g. openai)."),
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="Local CLIP weights file (.pt/.bin/.safetensors); wins over pretrained."),
        DeclareLaunchArgument("device", default_value="",
                              description="Inference device: auto, cpu, cuda or cuda:N (any N); empty keeps the "
                                          "params file's (auto)."),
        DeclareLaunchArgument("params_file",
                              default_value=PathJoinSubstitution([share, "config", "segment_node.yaml"]),
                              description="YAML file with the node's parameters."),
        DeclareLaunchArgument("vocabulary", default_value="",
                              description="Vocabulary: a preset name from config/vocabularies (indoor_robot, "
                                          "outdoor_driving, coco_panoptic, ade20k) or a path to a vocabulary "
                                          "YAML; empty keeps the params file's."),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node (one per camera)."),
        DeclareLaunchArgument("node_name", default_value="segment_node", description="Name of the node."),
        DeclareLaunchArgument("log_level", default_value="info", choices=["debug", "info", "warn", "error", "fatal"],
                              description="Logging level of the node."),
        DeclareLaunchArgument("depth", default_value="",
                              description="Depth image registered to the colour camera (16UC1 mm or 32FC1 m); "
                                          "given, it turns on ~/semantic/points (remaps the node's 'depth/image')."),
        DeclareLaunchArgument("camera_info", default_value="",
                              description="camera_info of the depth image (remaps 'depth/camera_info'); empty: "
                                          "the 'camera_info' topic beside the depth image."),
        DeclareLaunchArgument("nav2_compatible", default_value="", choices=BOOL_OR_KEEP,
                              description="Nav2 semantic layer mode: mono8 labels, more than 255 classes refused; "
                                          "empty keeps the params file's (false)."),
        DeclareLaunchArgument("use_sim_time", default_value="", choices=BOOL_OR_KEEP,
                              description="Follow the /clock topic (bag replay with --clock, a simulator) instead "
                                          "of system time; empty keeps the params file's (false)."),
        DeclareLaunchArgument("respawn", default_value="false", choices=["true", "false"],
                              description="Restart the node when its process dies (off by default)."),
        DeclareLaunchArgument("respawn_delay", default_value="2.0",
                              description="Seconds to wait before a respawn (with respawn:=true)."),
        DeclareLaunchArgument("rviz", default_value="false", choices=["true", "false"],
                              description="Also start rviz2 with config/ovseg.rviz (skipped, with a log line, when "
                                          "rviz2 is not installed)."),
        DeclareLaunchArgument("rviz_config", default_value=PathJoinSubstitution([share, "config", "ovseg.rviz"]),
                              description="rviz2 configuration file used with rviz:=true."),
    ]


def depth_camera_info(depth: str) -> str:
    """The camera_info topic beside a depth image topic (image_transport's convention)."""
    head = depth.rsplit("/", 1)[0] if "/" in depth.strip("/") else ""
    return f"{head}/camera_info" if head else "camera_info"


def _rviz_available() -> bool:
    if shutil.which("rviz2"):
        return True
    try:
        from ament_index_python.packages import get_package_prefix

        return os.path.isfile(os.path.join(get_package_prefix("rviz2"), "lib", "rviz2", "rviz2"))
    except Exception:  # noqa: BLE001  (PackageNotFoundError, or no ament index at all)
        return False


def _node(context: LaunchContext) -> list:
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    device = arg("device")
    if not DEVICE_RE.match(device):
        raise ValueError(f"launch argument device must be auto, cpu, cuda or cuda:N, got {device!r}")
    try:
        respawn_delay = float(arg("respawn_delay"))
    except ValueError:
        respawn_delay = -1.0
    if not respawn_delay >= 0.0:
        raise ValueError(
            f"launch argument respawn_delay must be a number of seconds >= 0, got {arg('respawn_delay')!r}")

    overrides: dict[str, object] = {
        "use_compressed": arg("use_compressed").lower() == "true",
        "image_reliability": arg("image_reliability"),
    }
    for name in ("segmenter", "preset", "model", "pretrained", "checkpoint", "device"):
        if arg(name):
            overrides[name] = arg(name)
    vocabulary = arg("vocabulary")
    if vocabulary:
        is_file = vocabulary.endswith((".yaml", ".yml")) or os.sep in vocabulary
        overrides["vocabulary_file"] = vocabulary if is_file else ""
        overrides["vocabulary_preset"] = "" if is_file else vocabulary
    if arg("nav2_compatible"):
        overrides["nav2_compatible"] = arg("nav2_compatible") == "true"
    sim_time = {"use_sim_time": arg("use_sim_time") == "true"} if arg("use_sim_time") else {}
    overrides.update(sim_time)
    image = arg("image")
    remappings = [("image", image), ("image/compressed", f"{image}/compressed")]
    depth = arg("depth")
    if depth:
        overrides["publish_points"] = True
        remappings += [("depth/image", depth), ("depth/camera_info", arg("camera_info") or depth_camera_info(depth))]
    elif arg("camera_info"):
        remappings.append(("depth/camera_info", arg("camera_info")))
    actions: list = [
        Node(
            package="ovseg_ros",
            executable="segment_node",
            name=arg("node_name"),
            namespace=arg("namespace"),
            parameters=[arg("params_file"), overrides],
            remappings=remappings,
            arguments=["--ros-args", "--log-level", arg("log_level")],
            output="screen",
            emulate_tty=True,
            respawn=arg("respawn") == "true",
            respawn_delay=respawn_delay,
        )
    ]
    if arg("rviz") == "true":
        if _rviz_available():
            actions.append(Node(package="rviz2", executable="rviz2", name="ovseg_rviz", parameters=[sim_time],
                                arguments=["-d", arg("rviz_config")], output="screen"))
        else:
            actions.append(LogInfo(msg="rviz:=true but rviz2 is not installed: not starting it "
                                       "(install ros-<distro>-rviz2, then open config/ovseg.rviz)"))
    return actions


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([*_arguments(), OpaqueFunction(function=_node)])
