"""Checks of launch/segment.launch.py that run without ROS's launch: every argument has a description (and
choices where useful), and the node action gets the right parameters and remappings. Where ``launch`` is
not installed, the launch file is executed against minimal stand-ins of the launch API it uses; where it is,
against the real one. (tests/test_launch.py starts it for real under launch_testing.)"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest

LAUNCH_FILE = Path(__file__).resolve().parents[2] / "launch" / "segment.launch.py"
EXPECTED_ARGS = {"image", "use_compressed", "image_reliability", "segmenter", "preset", "model", "pretrained",
                 "checkpoint", "device", "params_file", "vocabulary", "namespace", "node_name", "log_level"}
WITH_CHOICES = {"use_compressed", "image_reliability", "segmenter", "device", "log_level"}


class _Record:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


def _stub_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Minimal stand-ins for the parts of launch/launch_ros the file uses."""

    class LaunchConfiguration:
        def __init__(self, name: str) -> None:
            self.name = name

        def perform(self, context: Any) -> str:
            return context.values[self.name]

    class DeclareLaunchArgument(_Record):
        @property
        def name(self) -> str:
            return self.args[0]

    mods = {name: types.ModuleType(name) for name in
            ("launch", "launch.actions", "launch.substitutions", "launch_ros", "launch_ros.actions",
             "launch_ros.substitutions")}
    mods["launch"].LaunchContext = object
    mods["launch"].LaunchDescription = _Record
    mods["launch.actions"].DeclareLaunchArgument = DeclareLaunchArgument
    mods["launch.actions"].OpaqueFunction = _Record
    mods["launch.substitutions"].LaunchConfiguration = LaunchConfiguration
    mods["launch.substitutions"].PathJoinSubstitution = _Record
    mods["launch_ros.actions"].Node = _Record
    mods["launch_ros.substitutions"].FindPackageShare = _Record
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)


def _load(monkeypatch: pytest.MonkeyPatch) -> tuple[types.ModuleType, bool]:
    real = importlib.util.find_spec("launch") is not None and importlib.util.find_spec("launch_ros") is not None
    if not real:
        _stub_launch(monkeypatch)
    spec = importlib.util.spec_from_file_location("segment_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module, real


def test_arguments_have_descriptions_and_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    module, real = _load(monkeypatch)
    args = module._arguments()
    names = {a.name for a in args}
    assert names == EXPECTED_ARGS
    for a in args:
        description = a.description if real else a.kwargs.get("description")
        choices = a.choices if real else a.kwargs.get("choices")
        assert description and len(description) > 10, a.name
        if a.name in WITH_CHOICES:
            assert choices, a.name
    if real:
        ld = module.generate_launch_description()
        assert {a.name for a in ld.get_launch_arguments()} == EXPECTED_ARGS


@pytest.mark.parametrize(
    "vocabulary,expected",
    [("outdoor_driving", {"vocabulary_preset": "outdoor_driving", "vocabulary_file": ""}),
     ("/data/my_vocab.yaml", {"vocabulary_file": "/data/my_vocab.yaml", "vocabulary_preset": ""}),
     ("", {})],
)
def test_node_action(monkeypatch: pytest.MonkeyPatch, vocabulary: str, expected: dict) -> None:
    module, real = _load(monkeypatch)
    if real:
        pytest.skip("checked with the stand-ins only (real actions hide their arguments)")
    values = {"image": "/camera/color/image_raw", "use_compressed": "true", "image_reliability": "reliable",
              "segmenter": "dense_clip", "preset": "", "model": "", "pretrained": "", "checkpoint": "/w/tiny.pt",
              "device": "cpu", "params_file": "/p.yaml", "vocabulary": vocabulary, "namespace": "front",
              "node_name": "segment_node", "log_level": "debug"}
    (node,) = module._node(types.SimpleNamespace(values=values))
    kw = node.kwargs
    assert (kw["package"], kw["executable"], kw["name"], kw["namespace"]) == (
        "ovseg_ros", "segment_node", "segment_node", "front")
    params_file, overrides = kw["parameters"]
    assert params_file == "/p.yaml"
    assert overrides == {"use_compressed": True, "image_reliability": "reliable", "segmenter": "dense_clip",
                         "checkpoint": "/w/tiny.pt", "device": "cpu", **expected}
    assert kw["remappings"] == [("image", "/camera/color/image_raw"),
                                ("image/compressed", "/camera/color/image_raw/compressed")]
    assert kw["arguments"][-1] == "debug"
