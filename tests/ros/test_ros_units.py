"""Unit tests of segment_node's helpers: the latest-frame mailbox, QoS profiles, parameter specs and
validation, and the result -> message builders (label encodings, LabelInfo, vocabulary)."""

from __future__ import annotations

import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from ros_harness import messages_or_skip

from ovseg_ros.core.vocabulary import Vocabulary, load_vocabulary_file
from ovseg_ros.ros.mailbox import Frame, LatestFrameMailbox
from ovseg_ros.ros.params import (
    PARAMS,
    NodeConfig,
    find_vocabulary_preset,
    list_vocabulary_presets,
    parse_options,
    validate,
    validate_all,
)

CONFIG = Path(__file__).resolve().parents[2] / "config"


def _frame(i: int) -> Frame:
    return Frame(header=i, image=np.zeros((1, 1, 3), np.uint8), received=float(i))


# --- mailbox -------------------------------------------------------------------------------------------------
def test_mailbox_keeps_only_the_newest_frame_and_counts_drops() -> None:
    box = LatestFrameMailbox()
    assert box.put(_frame(1)) is False
    assert box.put(_frame(2)) is True
    assert box.put(_frame(3)) is True
    frame, dropped = box.take(timeout=0)
    assert frame.header == 3 and dropped == 2 and box.dropped_total == 2
    assert box.take(timeout=0.01) is None
    box.put(_frame(4))
    assert box.take(timeout=0)[1] == 0  # per-take count restarts


def test_mailbox_take_waits_and_close_wakes() -> None:
    box = LatestFrameMailbox()
    threading.Timer(0.05, box.put, args=(_frame(7),)).start()
    t0 = time.monotonic()
    assert box.take(timeout=5)[0].header == 7 and time.monotonic() - t0 < 4
    threading.Timer(0.05, box.close).start()
    assert box.take(timeout=5) is None
    box.reopen()
    box.put(_frame(8))
    box.clear()
    assert box.take(timeout=0) is None and box.dropped_total == 0


# --- QoS -----------------------------------------------------------------------------------------------------
def test_qos_profiles() -> None:
    pytest.importorskip("rclpy", reason="rclpy not importable")
    from rclpy.qos import DurabilityPolicy, ReliabilityPolicy

    from ovseg_ros.ros.qos import input_qos, latched_qos, output_qos

    assert input_qos().reliability == ReliabilityPolicy.BEST_EFFORT and input_qos().depth == 2
    assert input_qos(depth=1).depth == 1
    with pytest.raises(ValueError, match="image_queue_depth"):
        input_qos(depth=0)
    assert input_qos("reliable").reliability == ReliabilityPolicy.RELIABLE
    with pytest.raises(ValueError, match="image_reliability"):
        input_qos("maybe")
    out = output_qos()
    assert out.reliability == ReliabilityPolicy.RELIABLE and 1 <= out.depth <= 5
    lat = latched_qos()
    assert lat.durability == DurabilityPolicy.TRANSIENT_LOCAL and lat.depth == 1
    assert lat.reliability == ReliabilityPolicy.RELIABLE


# --- parameters ------------------------------------------------------------------------------------------------
def test_every_parameter_has_a_description_and_valid_default() -> None:
    defaults = {p.name: p.default for p in PARAMS}
    for p in PARAMS:
        assert len(p.description) > 15, p.name
    assert validate_all({**defaults, "vocabulary": []}) == []
    assert {"segmenter", "preset", "model", "pretrained", "checkpoint", "precision", "device", "offline",
            "cache_dir", "vocabulary", "vocabulary_file", "vocabulary_preset", "image_reliability",
            "use_compressed", "max_image_pixels", "overlay_alpha", "publish_panoptic", "diagnostics_period",
            "autostart", "segmenter_options"} <= set(defaults)


def test_default_params_file_matches_the_specs() -> None:
    import yaml

    values = yaml.safe_load((CONFIG / "segment_node.yaml").read_text())["/**"]["ros__parameters"]
    specs = {p.name: p for p in PARAMS}
    assert set(values) <= set(specs)
    for name, value in values.items():
        assert validate(name, value, values) is None, name
        assert value == specs[name].default, f"{name}: the file and the declared default differ"


@pytest.mark.parametrize(
    "name,value,expected",
    [("device", "cuda:1", None), ("device", "tpu", "device must be"), ("precision", "bf16", None),
     ("overlay_alpha", -0.1, "overlay_alpha must be in"), ("max_image_pixels", 8192 * 8192 + 1, "must be in"),
     ("segmenter_options", "{short_side: 96}", None), ("segmenter_options", "{a: 1}", "unknown option"),
     ("segmenter_options", "{logit_scale: .nan}", "finite"), ("segmenter_options", "{logit_scale: -1}", "> 0"),
     ("segmenter_options", "2001-12-14", "must be a mapping"), ("segmenter_options", "{short_side: 2001-12-14}",
                                                                 "must be an integer"),
     ("segmenter_options", "a: [", "not valid YAML"), ("device", "cpu\n", "device must be"),
     ("device", 3, "device must be"), ("overlay_alpha", float("nan"), "finite"), ("overlay_alpha", "x", "type"),
     ("vocabulary", ["a", ""], "the name is empty"), ("preset", "", None),
     ("image_queue_depth", 0, "must be in"), ("image_queue_depth", 11, "must be in"), ("image_queue_depth", 1, None),
     ("panoptic_min_area", -1, "must be in"), ("panoptic_min_area", 50, None), ("panoptic_min_area", 2.5, "type")],
)
def test_validate(name: str, value: object, expected: str | None) -> None:
    reason = validate(name, value, {"segmenter": "dense_clip"})
    assert (reason is None) if expected is None else (expected in reason)


def test_parse_options() -> None:
    assert parse_options("") == {} and parse_options("  ") == {}
    assert parse_options('{"short_side": 224}') == {"short_side": 224}
    with pytest.raises(ValueError, match="mapping"):
        parse_options("3")
    with pytest.raises(ValueError, match="must be a mapping"):
        parse_options("2001-12-14")  # a YAML date: refused with a reason, never a TypeError
    with pytest.raises(ValueError, match="expands to more than|nested more than"):
        parse_options("a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(6)))


def test_model_override_that_is_not_a_mapping_is_a_clean_error() -> None:
    defaults = {p.name: p.default for p in PARAMS}
    cfg = NodeConfig.from_values({**defaults, "segmenter": "dense_clip", "model": "ovseg-tiny-vit",
                                  "segmenter_options": "{model: ViT-B-16}"})
    with pytest.raises(ValueError, match="'model' must be a mapping"):
        cfg.segmenter_overrides()


def test_model_parameters_become_overrides(tmp_path: Path) -> None:
    defaults = {p.name: p.default for p in PARAMS}
    cfg = NodeConfig.from_values({**defaults, "model": "ovseg-tiny-vit", "checkpoint": "~/w.pt",
                                  "precision": "fp32", "segmenter_options": "{short_side: 96}"})
    over = cfg.segmenter_overrides()
    assert over["short_side"] == 96
    assert over["model"]["name"] == "ovseg-tiny-vit" and over["model"]["pretrained"] == ""
    assert over["model"]["checkpoint"] == str(Path("~/w.pt").expanduser()) and over["model"]["precision"] == "fp32"
    plain = NodeConfig.from_values(defaults)
    assert plain.segmenter_overrides() == {}  # nothing given: the preset decides
    assert plain.preset == "" and plain.resolved_preset() == "realtime"
    assert NodeConfig.from_values({**defaults, "preset": "sliding"}).resolved_preset() == "sliding"


def test_vocabulary_presets_are_found_and_load() -> None:
    names = list_vocabulary_presets()
    assert {"indoor_robot", "outdoor_driving"} <= set(names)
    for name in names:
        vocab = load_vocabulary_file(find_vocabulary_preset(name))
        assert len(vocab) > 0, name
    assert find_vocabulary_preset("../etc/passwd") is None and find_vocabulary_preset("nope") is None


# --- message builders -------------------------------------------------------------------------------------------
def test_label_encoding_switches_at_255_classes() -> None:
    messages = messages_or_skip()
    assert messages.label_encoding(1) == ("mono8", 255)
    assert messages.label_encoding(255) == ("mono8", 255)
    assert messages.label_encoding(256) == ("mono16", 65535)
    labels = np.array([[-1, 0, 254]], np.int32)
    out, enc = messages.encode_labels(labels, 255)
    assert enc == "mono8" and out.dtype == np.uint8 and out.tolist() == [[255, 0, 254]]
    out, enc = messages.encode_labels(np.array([[-1, 300, 65533]], np.int32), 65534)
    assert enc == "mono16" and out.dtype == np.uint16 and out.tolist() == [[65535, 300, 65533]]


def test_confidence_and_class_areas() -> None:
    messages = messages_or_skip()
    conf = messages.encode_confidence(np.array([0.0, 0.5, 1.0, 1.2], np.float32))
    assert conf.tolist() == [0, 128, 255, 255]
    ids, areas = messages.class_areas(np.array([[-1, 2, 2], [0, 2, -1]], np.int32), 4)
    assert ids == [0, 2] and areas == [1, 3]


def test_vocabulary_message() -> None:
    messages = messages_or_skip()
    vocab = Vocabulary.from_request(["floor", "person, people"], ["the ground", ""], [False, True], revision=7)
    msg = messages.vocabulary_msg(vocab, stamp=messages.VocabularyMsg().header.stamp, segmenter="dense_clip",
                                  model="m@x", prompts=[["a photo of a floor."], ["p1", "p2"]])
    assert msg.revision == 7 and msg.unlabeled_id == 255 and msg.label_encoding == "mono8"
    assert [(c.id, c.name, list(c.synonyms), c.is_thing) for c in msg.classes] == [
        (0, "floor", [], False), (1, "person", ["people"], True)]
    assert msg.classes[0].description == "the ground" and list(msg.classes[1].prompts) == ["p1", "p2"]


def test_label_info_message_leaves_unlabeled_out(monkeypatch: pytest.MonkeyPatch) -> None:
    messages = messages_or_skip()

    class VisionClass:
        def __init__(self, class_id: int, class_name: str) -> None:
            self.class_id, self.class_name = class_id, class_name

    class LabelInfo:
        def __init__(self) -> None:
            self.header = types.SimpleNamespace(stamp=None)
            self.class_map: list = []
            self.threshold = 0.0

    if "vision_msgs" not in sys.modules:  # stand-in where vision_msgs is not installed
        pkg, msg_mod = types.ModuleType("vision_msgs"), types.ModuleType("vision_msgs.msg")
        msg_mod.VisionClass, msg_mod.LabelInfo = VisionClass, LabelInfo
        monkeypatch.setitem(sys.modules, "vision_msgs", pkg)
        monkeypatch.setitem(sys.modules, "vision_msgs.msg", msg_mod)
    cls = messages.label_info_type()
    vocab = Vocabulary.from_request([f"c{i}" for i in range(300)])
    li = messages.label_info_msg(cls, vocab, stamp="now", threshold=0.25)
    assert [c.class_id for c in li.class_map] == list(range(300))
    assert li.class_map[5].class_name == "c5" and abs(li.threshold - 0.25) < 1e-6
    assert 255 in [c.class_id for c in li.class_map]  # a real class with >255 classes (labels are mono16)
    assert 65535 not in [c.class_id for c in li.class_map]


def test_executor_thread_survives_invalid_handle(monkeypatch: pytest.MonkeyPatch) -> None:
    """rclpy's executor raises InvalidHandle out of spin() when a transition destroys a subscription while it
    gathers its wait set; the node's spin loop counts it and spins on instead of ending the process. It is
    counted as recovered, not as an error: an ordinary transition must not turn /diagnostics WARN for 30 s."""
    pytest.importorskip("rclpy")
    from rclpy.exceptions import InvalidHandle

    from ovseg_ros.ros import process
    from ovseg_ros.ros.guard import ErrorLog

    monkeypatch.setattr(process.rclpy, "ok", lambda: True)

    class FlakyExecutor:
        calls = 0

        def spin(self) -> None:
            self.calls += 1
            if self.calls <= 2:
                raise InvalidHandle("cannot use Destroyable because destruction was requested")

    executor, stop = FlakyExecutor(), threading.Event()
    node = types.SimpleNamespace(errors=ErrorLog())
    process._spin(executor, stop, node)  # type: ignore[arg-type]
    assert executor.calls == 3 and stop.is_set()
    assert node.errors.snapshot() == (0, "", None)
    assert sum(node.errors.recovered.values()) == 2


def test_the_parameter_table_is_the_single_source_of_when_a_parameter_takes_effect() -> None:
    from ovseg_ros.ros.params import LIVE, ON_ACTIVATE, PARAMS, WHEN, descriptor

    assert all(p.when in WHEN for p in PARAMS)
    assert LIVE == {p.name for p in PARAMS if p.when == "live"} and "overlay_alpha" in LIVE
    assert ON_ACTIVATE == {p.name for p in PARAMS if p.when == "activate"} and "depth_slop" in ON_ACTIVATE
    assert not LIVE & ON_ACTIVATE
    for p in PARAMS:
        assert "takes effect" in descriptor(p).description, p.name


def test_cancelled_jobs_do_not_block_but_cannot_pile_up() -> None:
    """A timed-out (cancelled) job no longer makes the next request busy; but work that ignores cancellation
    cannot pile up threads: beside the live job at most MAX_STOPPING cancelled ones may still run."""
    pytest.importorskip("rclpy")
    from ovseg_ros.ros.vocabulary_service import MAX_STOPPING, JobRunner

    runner, gate = JobRunner(), threading.Event()
    first, why = runner.start("query", "q1", lambda: gate.wait(10))
    assert first is not None and why == ""
    second, why = runner.start("query", "q2", lambda: gate.wait(10))
    assert second is None and why.startswith("busy: q1")
    assert "within 0.1 s" in runner.wait(first, 0.1) and first.cancel.is_set()
    jobs = [first]
    for i in range(MAX_STOPPING):
        job, why = runner.start("query", f"q{i + 2}", lambda: gate.wait(10))
        assert job is not None, why
        assert runner.wait(job, 0.05)
        jobs.append(job)
    job, why = runner.start("query", "one too many", lambda: gate.wait(10))
    assert job is None and "still stopping" in why
    gate.set()
    assert all(j.done.wait(5) for j in jobs)
    job, why = runner.start("query", "after", lambda: 1)
    assert job is not None and runner.wait(job, 5) == "" and job.result == 1


def test_segment_node_help_lists_every_parameter_without_starting_ros() -> None:
    from ovseg_ros.ros.process import run, usage, wants_help

    assert wants_help(["--help"]) and wants_help(["-h", "--ros-args", "-p", "x:=1"])
    assert not wants_help(["--ros-args", "--help"])  # after --ros-args the words are ROS's
    assert not wants_help([])
    text = usage()
    assert text.startswith("usage: segment_node")
    for p in PARAMS:
        assert f"  {p.name} (" in text, p.name
    assert run(["--help"]) == 0  # returns before rclpy.init: no node, no DDS
