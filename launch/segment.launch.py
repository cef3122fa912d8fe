"""Launch segment_node on a camera topic.

    ros2 launch ovseg_ros segment.launch.py image:=/camera/color/image_raw vocabulary:=outdoor_driving

Parameters come from ``params_file`` (default: config/segment_node.yaml); arguments given here override
it. Outputs are private to the node (``<namespace>/<node_name>/semantic/labels`` etc.); one node per
camera, each in its own namespace. The node configures and activates itself (``autostart``); under
nav2_lifecycle_manager set ``autostart:=false`` in the params file and ``bond_timeout: 0.0`` in the
manager (an rclpy node has no bond).
"""

from __future__ import annotations

import os

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

SEGMENTERS = ["dense_clip", "itaclip", "clip_es", "car", "fcclip"]


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
        DeclareLaunchArgument("device", default_value="", choices=["", "auto", "cpu", "cuda", "cuda:0", "cuda:1"],
                              description="Inference device; empty keeps the params file's (auto)."),
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
    ]


def _node(context: LaunchContext) -> list[Node]:
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

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
    image = arg("image")
    return [
        Node(
            package="ovseg_ros",
            executable="segment_node",
            name=arg("node_name"),
            namespace=arg("namespace"),
            parameters=[arg("params_file"), overrides],
            remappings=[("image", image), ("image/compressed", f"{image}/compressed")],
            arguments=["--ros-args", "--log-level", arg("log_level")],
            output="screen",
            emulate_tty=True,
        )
    ]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([*_arguments(), OpaqueFunction(function=_node)])
