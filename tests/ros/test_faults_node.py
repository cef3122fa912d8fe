"""Fault injection (issue 9): peers on the ROS graph attack the real segment_node, which must survive.

The node runs the model-free ``color_key`` segmenter under a 30 Hz camera, so the exact labels of every
frame are known (fault_harness.FrameChecker). Each attack comes over loopback DDS from this process or,
for one test, from a separate process; after each, the node must be alive, answer lifecycle ``get_state``
within 1 s, be active, keep publishing, and every frame published so far must fit the vocabulary revision
it carries. A refusal must say why.
"""

from __future__ import annotations

import array
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fault_harness import (
    INITIAL,
    SCENES,
    StateProbe,
    Target,
    color_key_params,
    png_bytes,
    rss_peak_mib,
    shared_node_fixtures,
    valid_blank_png,
    wait_until,
)
from ros_harness import require_ros_or_skip

require_ros_or_skip()

from sensor_msgs.msg import CompressedImage  # noqa: E402


shared, node = shared_node_fixtures(lambda request: color_key_params(), "faults")


def _refused_with_reason(result: Any, what: str) -> None:
    assert not result.successful, f"{what} was accepted"
    assert result.reason.strip(), f"{what} was refused without a reason"


# --- the checker catches what it must (no node needed) --------------------------------------------------------
def test_frame_checker_reports_wrong_labels_revisions_and_duplicates() -> None:
    from fault_harness import ColorKeyOracle, FrameChecker
    from ros_harness import Collector
    from sensor_msgs.msg import Image

    from ovseg_ros.msg import SegmentationInfo, Vocabulary, VocabularyClass
    from ovseg_ros.ros.conversions import numpy_to_image

    class Stamps:  # stands in for the camera: every frame showed scene variant 0
        def variant_of(self, stamp: Any) -> int:
            return 0

    labels, info, vocab = Collector(), Collector(), Collector()
    oracle = ColorKeyOracle({})
    checker = FrameChecker(labels, info, vocab, Stamps(), oracle)  # type: ignore[arg-type]
    vocab(Vocabulary(revision=3, classes=[VocabularyClass(id=i, name=n) for i, n in enumerate(INITIAL)]))

    def frame(sec: int, arr: Any, revision: int = 3) -> None:
        msg = Image()
        msg.header.stamp.sec = sec
        labels(numpy_to_image(arr.astype("uint8"), "mono8", msg.header))
        i = SegmentationInfo(vocabulary_revision=revision)
        i.header.stamp.sec = sec
        info(i)

    good = oracle.expected(len(INITIAL), 0, 255)
    frame(1, good)
    assert checker.problems() == [] and checker.checked == 1
    wrong = good.copy()
    wrong[0, 0] = (int(wrong[0, 0]) + 1) % len(INITIAL)
    frame(2, wrong)
    assert any("differ" in p for p in checker.problems())
    out_of_range = good.copy()
    out_of_range[0, 0] = 7
    frame(3, out_of_range)
    assert any("outside revision 3" in p for p in checker.problems())
    frame(1, good)
    assert any("published twice" in p for p in checker.problems())
    checker.learn(3, ("a", "b"))
    assert any("named two vocabularies" in p for p in checker.problems())


# --- a healthy baseline (the checker itself works) --------------------------------------------------------
def test_baseline_frames_are_exact(node: Target) -> None:
    node.assert_healthy()
    assert wait_until(lambda: not node.checker.problems() and node.checker.checked >= 5, 20.0), node.tail()


# --- item 1: an exception in a parameter callback -----------------------------------------------------------
@pytest.mark.parametrize("value", [
    "2001-12-14",             # a YAML date: not JSON-serialisable, not a mapping
    "[2001-12-14, 1]",
    "{cost_ms: 2001-12-14}",  # a date where a number is expected
    "{max_distance: !!binary aGVsbG8=}",
    "{cost_ms: 5.0, no_such_option: 1}",
    "{: }",
    "{cost_ms: [1, [2, [3]]]}",
], ids=["date", "list-with-date", "date-option", "binary-option", "unknown-option", "null-key", "nested-list"])
def test_bad_segmenter_options_are_refused_with_a_reason(node: Target, value: str) -> None:
    before = node.get_param("segmenter_options")
    (result,) = node.set_params({"segmenter_options": value})
    if result.successful:
        node.set_params({"segmenter_options": before})  # do not leave it for the next configure
    _refused_with_reason(result, f"segmenter_options={value!r}")
    assert node.get_param("segmenter_options") == before
    node.assert_healthy()


@pytest.mark.parametrize("name,value,needle", [
    ("segmenter_options", "{max_distance: .nan}", "max_distance"),
    ("segmenter_options", "{max_distance: -1}", "max_distance"),
    ("segmenter_options", "{cost_ms: .inf}", "cost_ms"),
    ("segmenter_options", "{cost_ms: -5}", "cost_ms"),
    ("segmenter_options", "{max_distance: far}", "max_distance"),
    ("segmenter_options", "{colors: [red]}", "colors"),
    ("device", "cpu\n", "device"),
    ("overlay_alpha", float("nan"), "overlay_alpha"),
    ("max_image_pixels", -1, "max_image_pixels"),
    ("segmenter", "no_such_method", "segmenter"),
], ids=["nan-distance", "negative-distance", "inf-cost", "negative-cost", "string-distance", "bad-color",
        "device-newline", "nan-alpha", "negative-pixels", "unknown-segmenter"])
def test_invalid_values_are_refused_at_set_time(node: Target, name: str, value: Any, needle: str) -> None:
    """Item 9/11: every option is validated when it is set (ranges, finiteness, types), with the reason."""
    before = node.get_param(name)
    (result,) = node.set_params({name: value})
    if result.successful:
        node.set_params({name: before})  # do not leave it for the next configure
    _refused_with_reason(result, f"{name}={value!r}")
    assert needle in result.reason, result.reason
    assert node.get_param(name) == before
    node.assert_healthy()


def test_attack_from_another_process(node: Target) -> None:
    """`ros2 param set` with a YAML date and `ros2 topic pub` of a lying PNG, from a separate process."""
    script = Path(__file__).resolve().parent / "fault_attacker.py"
    out = subprocess.run([sys.executable, str(script), node.fqn, node.ns], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ))
    assert out.returncode == 0, f"attacker: {out.stdout}\n{out.stderr}\nnode:\n{node.tail()}"
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["answered"] and not answer["result"]["successful"] and answer["result"]["reason"], answer
    node.assert_healthy()


# --- item 6: YAML alias bombs ----------------------------------------------------------------------------------
def _alias_bomb(levels: int = 8, width: int = 9, mapping: bool = False) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    if mapping:
        lines.append(f"cost_ms: *a{levels - 1}")
        return "{" + ", ".join(lines) + "}"
    return "[" + ", ".join(line.split(": ", 1)[1] for line in lines) + "]"


@pytest.mark.parametrize("mapping", [False, True], ids=["list", "mapping"])
def test_yaml_alias_bomb_in_segmenter_options_is_refused_in_bounded_time(node: Target, mapping: bool) -> None:
    bomb = _alias_bomb(mapping=mapping)
    assert len(bomb) < 600
    peak0 = rss_peak_mib(node.proc.pid)
    t0 = time.monotonic()
    (result,) = node.set_params({"segmenter_options": bomb}, timeout=20.0)
    took = time.monotonic() - t0
    if result.successful:
        node.set_params({"segmenter_options": "{cost_ms: 5.0}"})
    _refused_with_reason(result, "an alias bomb")
    assert took < 3.0, f"the alias bomb took {took:.1f} s to refuse"
    assert len(result.reason) < 2000, "the reason formats the untrusted structure whole"
    assert rss_peak_mib(node.proc.pid) - peak0 < 150, "the alias bomb was expanded in memory"
    node.assert_healthy()


# --- items 6/11: vocabulary files, at configure ----------------------------------------------------------------
def _configure_with(node: Target, params: dict) -> tuple[list, bool]:
    """deactivate, cleanup, set ``params``, configure; (set results, configure succeeded)."""
    assert node.transition("deactivate") and node.transition("cleanup")
    results = node.set_params(params)
    t0 = time.monotonic()
    ok = node.transition("configure", timeout=60.0)
    assert time.monotonic() - t0 < 20.0, "configure took too long on a bad vocabulary file"
    return results, ok


@pytest.mark.parametrize("kind", ["alias-bomb", "not-utf8", "directory", "not-a-mapping"])
def test_bad_vocabulary_file_fails_configure_with_a_reason(node: Target, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "vocabulary.yaml"
    if kind == "alias-bomb":
        path.write_text("classes: " + _alias_bomb(levels=7) + "\n")
    elif kind == "not-utf8":
        path.write_bytes(b"classes:\n  - \xff\xfe chair\n  - door\n")
    elif kind == "directory":
        path = tmp_path
    else:
        path.write_text("- just\n- a list\n")
    peak0 = rss_peak_mib(node.proc.pid)
    try:
        results, ok = _configure_with(node, {"vocabulary": [], "vocabulary_file": str(path)})
        refused_at_set = [r for r in results if not r.successful]
        for r in refused_at_set:
            assert r.reason.strip(), "refused without a reason"
        if not refused_at_set:
            assert not ok, f"configure accepted a bad vocabulary file ({kind})"
            assert node.assert_state_answers() == "unconfigured"
            kv = node.diag(lambda kv: "configure failed" in kv.get("last_transition_error", ""), timeout=10.0)
            assert kv is not None, f"the configure failure is not on /diagnostics\n{node.tail()}"
            reason = kv["last_transition_error"]
            assert len(reason) < 2000, "the reason formats the untrusted structure whole"
            if kind != "alias-bomb":  # a raw decoder error ('utf-8' codec can't ...) does not say which file
                assert path.name in reason, f"the reason does not name the file: {reason!r}"
        assert rss_peak_mib(node.proc.pid) - peak0 < 150, "the vocabulary file was expanded in memory"
        assert node.proc.alive()
    finally:
        if node.state(10.0) == "inactive":
            node.transition("cleanup")
        node.set_params({"vocabulary": list(INITIAL), "vocabulary_file": ""})
    node.bring_active()
    node.assert_healthy()


# --- item 2: compressed images ---------------------------------------------------------------------------------
def _send_compressed_until_refused(node: Target, data: bytes, needle: str = "", timeout: float = 20.0) -> str:
    """Publish ``data`` as a PNG CompressedImage until /diagnostics counts a new refusal; its reason."""
    pub = node.client.publisher(f"{node.ns}/image/compressed", CompressedImage)
    try:
        kv = node.diag(timeout=10.0)
        assert kv is not None, f"no diagnostics\n{node.tail()}"
        before = int(kv["frames_refused"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert node.proc.alive(), f"the node died on a CompressedImage:\n{node.tail()}"
            msg = CompressedImage(format="png", data=array.array("B", data))
            msg.header.frame_id = "attacker"
            pub.publish(msg)
            kv = node.diag(timeout=1.5)
            if kv is not None and int(kv["frames_refused"]) > before and needle in kv["last_refusal_reason"]:
                return kv["last_refusal_reason"]
        pytest.fail(f"no refusal containing {needle!r} reported\n{node.tail()}")
    finally:
        node.client.node.destroy_publisher(pub)


@pytest.mark.parametrize("kind", ["claims-50000x50000", "claims-20000x20000", "garbage", "empty-idat",
                                  "truncated-header"])
def test_compressed_image_that_lies_is_refused(node: Target, kind: str) -> None:
    data = {
        "claims-50000x50000": png_bytes(50000, 50000, b"\x78\x9c" + bytes(256)),
        "claims-20000x20000": png_bytes(20000, 20000, b"\x78\x9c" + bytes(256)),
        "garbage": b"\x89PNG\r\n\x1a\n" + os.urandom(512),
        "empty-idat": png_bytes(64, 48, b""),
        "truncated-header": png_bytes(64, 48, b"")[:20],
    }[kind]
    peak0 = rss_peak_mib(node.proc.pid)
    reason = _send_compressed_until_refused(node, data)
    assert reason.strip()
    if kind.startswith("claims-"):
        size = kind.split("-")[1]
        assert size in reason, f"the refusal does not say the claimed size: {reason!r}"
        assert rss_peak_mib(node.proc.pid) - peak0 < 150, "the claimed size was allocated before the refusal"
    node.assert_healthy()


def test_valid_png_over_max_image_pixels_is_refused_before_decoding(node: Target) -> None:
    data = valid_blank_png(20000, 20000)  # 400 MB of pixels in ~400 kB
    peak0 = rss_peak_mib(node.proc.pid)
    reason = _send_compressed_until_refused(node, data, needle="max_image_pixels")
    assert "20000" in reason, reason
    grew = rss_peak_mib(node.proc.pid) - peak0
    assert grew < 150, f"peak memory grew by {grew:.0f} MiB: the image was decoded before the pixel limit"
    node.assert_healthy()


# --- item 11: query bound ----------------------------------------------------------------------------------
def test_query_with_thousands_of_texts_is_refused(node: Target) -> None:
    t0 = time.monotonic()
    resp = node.query([f"thing number {i}" for i in range(5000)], timeout=120.0)
    took = time.monotonic() - t0
    assert not resp.success, "a query of 5000 texts was served"
    assert resp.message.strip() and len(resp.masks) == 0
    assert took < 10.0, f"the refusal took {took:.1f} s"
    node.assert_healthy()


# --- item 11: refusals are logged; a name that is another class's synonym is not silent ----------------------
def test_refused_vocabulary_change_is_logged_with_its_reason(node: Target) -> None:
    resp = node.set_vocabulary(["chair", "Chair"])
    assert not resp.success and resp.message.strip()
    assert node.proc.wait_for_log(resp.message[:60], timeout=5.0), f"the refusal is not in the log\n{node.tail()}"
    node.assert_healthy()


def test_class_name_equal_to_another_classes_synonym_is_not_silent(node: Target) -> None:
    start = len(node.proc.output())
    resp = node.set_vocabulary(["chair, seat", "seat"])
    try:
        if resp.success:
            def warned() -> bool:
                new_log = node.proc.output()[start:]
                return "synonym" in new_log.lower() and "seat" in new_log

            assert wait_until(warned, 5.0), f"accepted without a warning: {resp.message!r}\n{node.tail()}"
        else:
            assert "seat" in resp.message, resp.message
    finally:
        assert node.set_vocabulary(INITIAL).success
    node.assert_healthy()


# --- item 5: concurrent vocabulary changes -----------------------------------------------------------------------
def test_concurrent_set_vocabulary_calls_never_block_the_executor(node: Target) -> None:
    """Four changes at once (a few seconds of encoding each): get_state keeps answering within 1 s, frames keep
    coming during the encoding, every call is answered (accepted, or refused as busy with the reason)."""
    sets = [[f"c{j} item {i}" for i in range(1500)] for j in range(4)]
    with StateProbe(node) as probe:
        calls = [node.set_vocabulary_async(s) for s in sets]
        time.sleep(0.5)
        during = node.labels.wait_for(timeout=5.0, new_only=True)
        for _, done in calls:
            assert done.wait(60.0), f"a set_vocabulary call was never answered\n{node.tail()}"
    probe.check()
    assert during is not None, "no frames were published while vocabularies were encoding"
    results = [f.result() for f, _ in calls]
    accepted = [(r, s) for r, s in zip(results, sets) if r.success]
    for r in results:
        assert r.success or r.message.strip(), "a refused change carries no reason"
    assert accepted, "every concurrent change was refused"
    for r, s in accepted:
        node.checker.learn(int(r.revision), tuple(s))
    in_use = node.vocabulary_in_use()
    last = max(accepted, key=lambda rs: rs[0].revision)
    assert in_use.revision == last[0].revision and [c.name for c in in_use.classes] == last[1]
    node.assert_healthy()
    assert node.set_vocabulary(INITIAL).success


def test_rapid_deactivate_activate_under_a_fast_stream(node: Target) -> None:
    """Subscriptions go away at deactivate while messages for them are ready in the executor (the race the
    soak found: "executor stopped: InvalidHandle"); raw and compressed frames at 30 Hz, 15 quick cycles."""
    import cv2

    ok, png = cv2.imencode(".png", cv2.cvtColor(SCENES[0], cv2.COLOR_RGB2BGR))
    assert ok
    pub = node.client.publisher(f"{node.ns}/image/compressed", CompressedImage)
    stop = threading.Event()

    def stream() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            msg = CompressedImage(format="png", data=array.array("B", png.tobytes()))
            msg.header.frame_id = "fast_camera"
            msg.header.stamp.sec, msg.header.stamp.nanosec = 3_000_000 + n, 11
            pub.publish(msg)
            stop.wait(1 / 30)

    feeder = threading.Thread(target=stream, daemon=True)
    feeder.start()
    try:
        with StateProbe(node) as probe:
            for i in range(15):
                assert node.transition("deactivate", timeout=30.0), f"deactivate {i} failed\n{node.tail()}"
                assert node.proc.alive(), f"the node died at deactivate {i}\n{node.tail()}"
                time.sleep(0.05 * (i % 3))
                assert node.transition("activate", timeout=30.0), f"activate {i} failed\n{node.tail()}"
                assert node.proc.alive(), f"the node died at activate {i}\n{node.tail()}"
                time.sleep(0.05 * (i % 4))
        probe.check()
    finally:
        stop.set()
        feeder.join(2.0)
        node.client.node.destroy_publisher(pub)
    node.assert_healthy()


# --- item 3: transitions while services run ------------------------------------------------------------------------
def test_cleanup_while_set_vocabulary_and_queries_run(node: Target) -> None:
    big = [f"object {i}" for i in range(2000)]
    with StateProbe(node) as probe:
        vocab_call = node.set_vocabulary_async(big)
        queries = []
        for i in range(4):
            from ovseg_ros.srv import Query

            cli = node.client.node.create_client(Query, node.srv("query"))
            assert cli.wait_for_service(timeout_sec=10.0)
            done = threading.Event()
            fut = cli.call_async(Query.Request(texts=[f"text {i} {j}" for j in range(200)]))
            fut.add_done_callback(lambda _f, d=done: d.set())
            queries.append((fut, done, cli))
        time.sleep(0.3)
        assert node.transition("deactivate", timeout=30.0)
        cleaned = node.transition("cleanup", timeout=30.0)
        assert node.proc.alive(), f"the node died during cleanup with calls in flight:\n{node.tail()}"
        assert cleaned, "cleanup failed"
        vocab_call[1].wait(30.0)
    probe.check()
    for fut, done, _ in [(vocab_call[0], vocab_call[1], None)] + queries:
        if done.is_set():
            r = fut.result()
            assert r.success or r.message.strip(), "an interrupted call was answered without a reason"
    assert node.transition("configure") and node.transition("activate")
    in_use = node.vocabulary_in_use()
    assert [c.name for c in in_use.classes] == INITIAL, "a vocabulary encoded before cleanup survived it"
    node.assert_healthy()


def test_reconfigure_while_set_vocabulary_encodes_never_installs_it(node: Target) -> None:
    """Item 4: cleanup -> configure while a change encodes: the late result is answered as stale, never used."""
    big = [f"object {i}" for i in range(2000)]
    fut, done = node.set_vocabulary_async(big)
    time.sleep(0.3)
    t_cleanup = time.monotonic()
    assert node.transition("deactivate", timeout=30.0) and node.transition("cleanup", timeout=30.0)
    assert node.transition("configure", timeout=30.0) and node.transition("activate", timeout=30.0)
    assert done.wait(30.0), f"the in-flight set_vocabulary was never answered\n{node.tail()}"
    answered_after_cleanup = fut.answered_at >= t_cleanup
    resp = fut.result()
    time.sleep(1.0)  # a late swap would land now
    in_use = node.vocabulary_in_use()
    assert [c.name for c in in_use.classes] == INITIAL, (
        f"the vocabulary requested before the reconfigure was installed after it (revision {in_use.revision})")
    if answered_after_cleanup and resp.success:
        assert resp.revision != in_use.revision
    node.assert_healthy()
    late = [m for m in node.vocab.snapshot() if len(m.classes) == len(big)]
    assert not late or late[-1].revision < in_use.revision, "the stale vocabulary was published after configure"


# --- item 11: deactivate/activate under load --------------------------------------------------------------------
def test_deactivate_activate_cycles_under_load(node: Target) -> None:
    with StateProbe(node) as probe:
        for _ in range(5):
            assert node.transition("deactivate", timeout=30.0)
            time.sleep(0.4)  # an in-flight frame drains
            n0 = len(node.labels.snapshot())
            time.sleep(0.5)
            assert len(node.labels.snapshot()) == n0, "outputs while inactive"
            assert node.transition("activate", timeout=30.0)
            assert node.labels.wait_for(timeout=10.0, new_only=True) is not None, "no frames after activate"
    probe.check()
    time.sleep(1.0)
    node.assert_healthy()  # includes: no frame published twice (two workers after a late join would)
