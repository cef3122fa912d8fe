"""ovseg-nav2-params: the generated semantic_segmentation_layer block loads as YAML, names every class of the
vocabulary exactly once (the layer matches LabelInfo names), uses the layer's parameter names, and applies
costs per class, per group and by default."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ovseg_ros.tools import nav2_params as np2

ROOT = Path(__file__).resolve().parents[2]
SOURCE_KEYS = {"segmentation_topic", "confidence_topic", "labels_topic", "pointcloud_topic", "observation_persistence",
               "expected_update_rate", "max_obstacle_distance", "min_obstacle_distance", "tile_map_decay_time",
               "visualize_tile_map", "use_cost_selection", "class_types"}
TYPE_KEYS = {"classes", "base_cost", "max_cost", "mark_confidence", "samples_to_max_cost", "dominant_priority"}


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = np2.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def source_of(doc: dict, layer: str = "semantic_layer") -> dict:
    block = doc[layer]
    assert block["plugin"] == "semantic_segmentation_layer::SemanticSegmentationLayer"
    return block[block["observation_sources"]]


def classes_named(src: dict) -> list[str]:
    return [name for t in src["class_types"] for name in src[t]["classes"]]


@pytest.mark.parametrize("preset", ["indoor_robot", "outdoor_driving", "coco_panoptic"])
def test_every_class_named_once(capsys: pytest.CaptureFixture, preset: str) -> None:
    from ovseg_ros.core.vocabulary import find_vocabulary_preset, load_vocabulary_file

    rc, out, _ = run(capsys, "--preset", preset)
    assert rc == 0
    src = source_of(yaml.safe_load(out))
    vocab = load_vocabulary_file(find_vocabulary_preset(preset))
    assert sorted(classes_named(src)) == sorted(vocab.names)
    assert len(classes_named(src)) == len(set(classes_named(src)))
    assert set(src) == SOURCE_KEYS | set(src["class_types"])
    for t in src["class_types"]:
        assert set(src[t]) == TYPE_KEYS
        assert t.replace("_", "").isalnum() and t[0].isalpha()  # a valid parameter name segment
    assert src["segmentation_topic"] == "/segment_node/semantic/labels"
    assert src["pointcloud_topic"] == "/segment_node/semantic/points"
    assert src["labels_topic"] == "/segment_node/label_info"


def test_costs_per_class_group_and_default(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    vocab = tmp_path / "v.yaml"
    vocab.write_text(yaml.safe_dump({"classes": [
        {"name": "floor", "is_thing": False}, {"name": "person", "is_thing": True}, "chair", "table",
        {"name": "trash can", "is_thing": True}, {"name": "grass", "is_thing": False}]}))
    rc, out, _ = run(capsys, "--vocabulary-file", str(vocab), "--cost", "floor=free", "--cost", "person=lethal",
                     "--group", "furniture=chair,table", "--cost", "furniture=200", "--cost", "stuff=low",
                     "--default-cost", "128", "--topics-node", "/robot/front/segment_node")
    assert rc == 0
    src = source_of(yaml.safe_load(out))
    cost = {src[t]["classes"][0]: (src[t]["base_cost"], src[t]["max_cost"], src[t]["dominant_priority"])
            for t in src["class_types"]}
    assert cost == {"floor": (0, 0, False), "person": (254, 254, True), "chair": (200, 200, False),
                    "table": (200, 200, False), "trash can": (128, 128, False), "grass": (64, 64, False)}
    assert "trash_can" in src["class_types"]
    assert src["confidence_topic"] == "/robot/front/segment_node/semantic/confidence"


def test_wrapped_for_a_costmap(capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = run(capsys, "--preset", "indoor_robot", "--wrap", "local_costmap", "--layer", "sem")
    params = yaml.safe_load(out)["local_costmap"]["local_costmap"]["ros__parameters"]
    assert params["plugins"] == ["sem"]
    source_of(params, "sem")


def test_worked_example_names_every_class_of_its_preset() -> None:
    from ovseg_ros.core.vocabulary import find_vocabulary_preset, load_vocabulary_file

    doc = yaml.safe_load((ROOT / "config" / "nav2" / "semantic_layer.yaml").read_text())
    params = doc["local_costmap"]["local_costmap"]["ros__parameters"]
    src = source_of(params, params["plugins"][0])
    assert sorted(classes_named(src)) == sorted(load_vocabulary_file(find_vocabulary_preset("indoor_robot")).names)


def test_clashing_type_names_stay_unique() -> None:
    entries = [np2.VocabEntry(n, False) for n in ["trash can", "trash-can", "3d printer", "Trash Can!"]]
    block = np2.layer_params(entries, [0, 0, 0, 0])
    src = block["ovseg"]
    assert len(set(src["class_types"])) == 4
    assert classes_named(src) == ["trash can", "trash-can", "3d printer", "Trash Can!"]


@pytest.mark.parametrize("argv,reason", [
    (["--preset", "nope"], "unknown vocabulary preset 'nope'"),
    (["--preset", "indoor_robot", "--cost", "sky=free"], "neither a class"),
    (["--preset", "indoor_robot", "--cost", "floor=300"], "outside 0-254"),
    (["--preset", "indoor_robot", "--cost", "floor=cheap"], "neither a number"),
    (["--preset", "indoor_robot", "--cost", "floor"], "expected NAME=COST"),
    (["--preset", "indoor_robot", "--group", "g=floor,sky"], "sky not in the vocabulary"),
    (["--vocabulary-file", "/does/not/exist.yaml"], "does not exist"),
])
def test_bad_input_is_refused_with_the_reason(capsys: pytest.CaptureFixture, argv: list, reason: str) -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == "" and reason in err


def test_more_than_255_classes_refused(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    vocab = tmp_path / "big.yaml"
    vocab.write_text(yaml.safe_dump({"classes": [f"thing {i}" for i in range(256)]}))
    rc, _, err = run(capsys, "--vocabulary-file", str(vocab))
    assert rc == 2 and "uint8" in err and "nav2_compatible" in err


def test_output_file(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "layer.yaml"
    rc, stdout, _ = run(capsys, "--preset", "indoor_robot", "-o", str(out))
    assert rc == 0 and stdout == ""
    assert classes_named(source_of(yaml.safe_load(out.read_text())))


def test_class_names_that_are_layer_parameters_are_renamed_and_reported(capsys, tmp_path: Path) -> None:
    """A class "class types" must not become the source's ``class_types`` (it would replace the list of class
    types and the real layer would exit): every class of the layer's own parameter names is renamed and said."""
    names = ["class types", "segmentation topic", "Labels-Topic", "sensor_frame", "camera horizontal fov", "floor",
             "class_types_class"]
    vocab = tmp_path / "v.yaml"
    vocab.write_text(yaml.safe_dump({"classes": names}))
    rc, out, err = run(capsys, "--vocabulary-file", str(vocab))
    assert rc == 0
    block = yaml.safe_load(out)["semantic_layer"]
    src = source_of({"semantic_layer": block})
    assert isinstance(src["class_types"], list) and len(src["class_types"]) == len(names)
    assert src["segmentation_topic"] == "/segment_node/semantic/labels" and src["labels_topic"].endswith("label_info")
    assert not set(src["class_types"]) & np2.SOURCE_PARAMS
    assert classes_named(src) == names  # the layer still matches the original class names
    for key in ("class_types", "segmentation_topic", "labels_topic", "sensor_frame", "camera_horizontal_fov"):
        assert f"its class type is named '{key}_class" in err
        assert f"# note: class" in out
    assert "'floor'" not in err
    assert len(set(src["class_types"])) == len(names)


def test_exact_time_pairing_is_generated(capsys) -> None:
    rc, out, _ = run(capsys, "--preset", "indoor_robot")
    assert rc == 0 and yaml.safe_load(out)["semantic_layer"]["use_approximate_time_sync"] is False


def test_source_name_cannot_be_a_layer_parameter(capsys) -> None:
    rc, out, err = run(capsys, "--preset", "indoor_robot", "--source", "enabled")
    assert rc == 2 and out == "" and "--source 'enabled'" in err
