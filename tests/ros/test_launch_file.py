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
                 "checkpoint", "device", "params_file", "vocabulary", "namespace", "node_name", "log_level",
                 "depth", "camera_info", "nav2_compatible", "respawn", "respawn_delay", "rviz", "rviz_config",
                 "use_sim_time"}
WITH_CHOICES = {"use_compressed", "image_reliability", "segmenter", "log_level", "nav2_compatible", "respawn",
                "rviz", "use_sim_time"}


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
    mods["launch.actions"].LogInfo = _Record
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
    values = {**BASE_VALUES, "vocabulary": vocabulary}
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
    assert (kw["respawn"], kw["respawn_delay"]) == (False, 2.0)


BASE_VALUES = {"image": "/camera/color/image_raw", "use_compressed": "true", "image_reliability": "reliable",
               "segmenter": "dense_clip", "preset": "", "model": "", "pretrained": "", "checkpoint": "/w/tiny.pt",
               "device": "cpu", "params_file": "/p.yaml", "vocabulary": "", "namespace": "front",
               "node_name": "segment_node", "log_level": "debug", "depth": "", "camera_info": "",
               "nav2_compatible": "", "respawn": "false", "respawn_delay": "2.0", "rviz": "false",
               "rviz_config": "/share/ovseg.rviz", "use_sim_time": ""}


def _run(monkeypatch: pytest.MonkeyPatch, **values: str) -> list:
    module, real = _load(monkeypatch)
    if real:
        pytest.skip("checked with the stand-ins only (real actions hide their arguments)")
    return module._node(types.SimpleNamespace(values={**BASE_VALUES, **values}))


@pytest.mark.parametrize("depth,camera_info,expected_info", [
    ("/camera/aligned_depth_to_color/image_raw", "", "/camera/aligned_depth_to_color/camera_info"),
    ("/cam/depth/image_rect_raw", "/cam/depth/info", "/cam/depth/info"),
    ("depth_image", "", "camera_info"),
])
def test_depth_turns_points_on(monkeypatch: pytest.MonkeyPatch, depth: str, camera_info: str,
                               expected_info: str) -> None:
    (node,) = _run(monkeypatch, depth=depth, camera_info=camera_info, nav2_compatible="true")
    _, overrides = node.kwargs["parameters"]
    assert overrides["publish_points"] is True and overrides["nav2_compatible"] is True
    remaps = dict(node.kwargs["remappings"])
    assert remaps["depth/image"] == depth and remaps["depth/camera_info"] == expected_info


def test_no_depth_leaves_points_to_the_params_file(monkeypatch: pytest.MonkeyPatch) -> None:
    (node,) = _run(monkeypatch)
    _, overrides = node.kwargs["parameters"]
    assert "publish_points" not in overrides and "nav2_compatible" not in overrides
    assert "depth/image" not in dict(node.kwargs["remappings"])


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1", "cuda:7", "cuda:12", "cuda", "cpu", "auto", ""])
def test_any_cuda_index_is_accepted(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    (node,) = _run(monkeypatch, device=device)
    assert node.kwargs["parameters"][1].get("device", "") == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cuda:-1"])
def test_bad_device_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    with pytest.raises(ValueError, match="cuda:N"):
        _run(monkeypatch, device=device)


def test_respawn(monkeypatch: pytest.MonkeyPatch) -> None:
    (node,) = _run(monkeypatch, respawn="true", respawn_delay="5")
    assert (node.kwargs["respawn"], node.kwargs["respawn_delay"]) == (True, 5.0)


@pytest.mark.parametrize("delay", ["soon", "-1", "nan"])
def test_bad_respawn_delay_is_refused(monkeypatch: pytest.MonkeyPatch, delay: str) -> None:
    with pytest.raises(ValueError, match="respawn_delay"):
        _run(monkeypatch, respawn="true", respawn_delay=delay)


@pytest.mark.parametrize("available", [True, False])
def test_rviz_started_only_when_installed(monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
    module, real = _load(monkeypatch)
    if real:
        pytest.skip("checked with the stand-ins only")
    monkeypatch.setattr(module, "_rviz_available", lambda: available)
    actions = module._node(types.SimpleNamespace(values={**BASE_VALUES, "rviz": "true"}))
    assert len(actions) == 2
    extra = actions[1].kwargs
    if available:
        assert (extra["package"], extra["executable"]) == ("rviz2", "rviz2")
        assert extra["arguments"] == ["-d", "/share/ovseg.rviz"]
    else:
        assert "rviz2 is not installed" in extra["msg"]
    assert len(module._node(types.SimpleNamespace(values=BASE_VALUES))) == 1


def test_rviz_config_and_nav2_example_are_installed_files() -> None:
    root = LAUNCH_FILE.parents[1]
    assert (root / "config" / "ovseg.rviz").is_file()
    assert (root / "config" / "nav2" / "semantic_layer.yaml").is_file()


def test_segmenter_choices_are_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launch file lists the segmenters for its ``choices``; the registry finds them in the package."""
    from ovseg_ros.core.segmenter import list_segmenters

    module, _ = _load(monkeypatch)
    assert sorted(module.SEGMENTERS) == list_segmenters()


def test_every_module_of_the_segmenters_package_registers_a_segmenter() -> None:
    import pkgutil

    from ovseg_ros.core import segmenters
    from ovseg_ros.core.segmenter import get_segmenter_class, list_segmenters

    modules = {m.name for m in pkgutil.iter_modules(segmenters.__path__) if not m.name.startswith("_")}
    registered = {get_segmenter_class(n).__module__.rsplit(".", 1)[-1] for n in list_segmenters()}
    assert modules == registered


@pytest.mark.parametrize("value,expected", [("true", True), ("false", False), ("", None)])
def test_use_sim_time_reaches_the_node_and_rviz(monkeypatch: pytest.MonkeyPatch, value: str, expected: Any) -> None:
    module, real = _load(monkeypatch)
    if real:
        pytest.skip("checked with the stand-ins only")
    monkeypatch.setattr(module, "_rviz_available", lambda: True)
    node, rviz = module._node(types.SimpleNamespace(values={**BASE_VALUES, "use_sim_time": value, "rviz": "true"}))
    _, overrides = node.kwargs["parameters"]
    assert overrides.get("use_sim_time") is expected  # empty: the params file's value stays
    assert rviz.kwargs["parameters"] == ([{"use_sim_time": expected}] if expected is not None else [{}])
