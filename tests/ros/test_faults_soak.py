"""Randomised interleavings (issue 9): lifecycle transitions, set_vocabulary, query and parameter sets from
three client threads at once, against the real node under a 30 Hz camera, for a bounded time.

CI runs a short, seeded version; the long run is the same test with more time::

    OVSEG_SOAK_SECONDS=600 OVSEG_SOAK_SEED=1 bash scripts/test.sh tests/ros/test_faults_soak.py

Issue 17 adds: ``vocabulary_timeout`` values short enough for requests to time out (the next one must then be
served, not "busy" until the abandoned work ends: checked at the end), slow inferences (up to 300 ms a frame,
in flight across deactivate/cleanup), ``~/query`` without an image while the node is inactive (must be refused:
no frame from before the deactivate), and a reliable subscriber of the labels that stops reading (a process
frozen with SIGSTOP for the whole run: publishing must go on).

Throughout: the process stays alive and answers get_state within 1 s (polled every 0.25 s); every call
is answered (except one whose service was being destroyed by a cleanup at that moment), and every refusal
carries a reason. At the end the node returns to active and publishes, and every frame published during
the run has exactly the labels color_key computes for the vocabulary revision the frame carries.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, Iterator, Optional

import pytest
from fault_harness import INITIAL, StateProbe, Target, color_key_params, to_parameter_msg
from ros_harness import RosClient, make_image, require_ros_or_skip

require_ros_or_skip()

from rcl_interfaces.srv import SetParameters  # noqa: E402

from ovseg_ros.srv import Query, SetVocabulary  # noqa: E402

SOAK_S = float(os.environ.get("OVSEG_SOAK_SECONDS", "40"))
SEED = int(os.environ.get("OVSEG_SOAK_SEED", "9"))
CALL_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def node(client: RosClient, namespace: str, tmp_path_factory: Any) -> Iterator[Target]:
    t = Target(client, f"{namespace}_soak", color_key_params(), tmp_path_factory.mktemp("soak"))
    try:
        t.wait_active()
        yield t
    finally:
        t.close()


class Soak:
    """Shared bookkeeping of the actor threads."""

    def __init__(self, node: Target, deadline: float) -> None:
        self.node, self.deadline = node, deadline
        self.violations: list[str] = []
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.teardowns: list[tuple[float, float]] = []  # (start, end) of cleanup/shutdown transitions
        self.transitions = 0  # bumped before and after every transition (a query sees whether one overlapped)

    def note(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def fail(self, text: str) -> None:
        with self.lock:
            self.violations.append(text)

    def torn_down_during(self, t0: float, t1: float) -> bool:
        with self.lock:
            return any(s <= t1 and e >= t0 for s, e in self.teardowns) or not self.teardowns_closed()

    def teardowns_closed(self) -> bool:
        return all(e != float("inf") for _, e in self.teardowns)

    def call(self, srv_type: type, name: str, request: Any, what: str) -> Optional[Any]:
        """One service call; None when the service is absent (node not configured) or the answer was lost
        to a cleanup; a missing answer otherwise is a violation."""
        cli = self.node.client.node.create_client(srv_type, self.node.srv(name))
        try:
            if not cli.wait_for_service(timeout_sec=0.5):
                self.note(f"{what}: no service")
                return None
            done = threading.Event()
            t0 = time.monotonic()
            fut = cli.call_async(request)
            fut.add_done_callback(lambda _f: done.set())
            if not done.wait(CALL_TIMEOUT_S):
                if self.torn_down_during(t0, time.monotonic()):
                    self.note(f"{what}: lost to a cleanup")
                else:
                    self.fail(f"{what} not answered within {CALL_TIMEOUT_S} s")
                return None
            return fut.result()
        finally:
            self.node.client.node.destroy_client(cli)


def _vocab_actor(s: Soak, rng: random.Random, tid: int) -> None:
    k = 0
    while time.monotonic() < s.deadline:
        k += 1
        roll = rng.random()
        if roll < 0.15:
            classes, valid = ["chair", "Chair"], False
        elif roll < 0.25:
            classes, valid = [], False
        else:
            n = rng.choice([1, 3, 6, 20, 300, 1200])
            classes, valid = [f"t{tid} v{k} c{i}" for i in range(n)], True
        resp = s.call(SetVocabulary, "set_vocabulary", SetVocabulary.Request(classes=classes), "set_vocabulary")
        if resp is None:
            continue
        if resp.success:
            if not valid:
                s.fail(f"an invalid vocabulary was accepted: {classes[:3]}")
            s.node.checker.learn(int(resp.revision), tuple(classes))
            s.note("set_vocabulary: accepted")
        elif not resp.message.strip():
            s.fail("set_vocabulary refused without a reason")
        else:
            s.note("set_vocabulary: refused")
        time.sleep(rng.uniform(0.0, 0.3))


def _query_actor(s: Soak, rng: random.Random, tid: int) -> None:
    while time.monotonic() < s.deadline:
        roll = rng.random()
        req = Query.Request(texts=[f"thing {i}" for i in range(rng.randint(1, 5))])
        expect_refusal = False
        before, marks = s.node.state(5.0), s.transitions
        if roll < 0.15:
            req.texts, expect_refusal = [], True
        elif roll < 0.3:
            bad = make_image(32, 24, "rgb8")
            bad.encoding = "yuv422"
            req.image, expect_refusal = bad, True
        resp = s.call(Query, "query", req, "query")
        if resp is not None:
            if resp.success and expect_refusal:
                s.fail("an invalid query was served")
            inactive = before in ("inactive", "unconfigured") and s.transitions == marks
            if resp.success and inactive and req.image.width == 0:
                s.fail("a query while inactive was answered on a frame from before the deactivate")
            if not resp.success and not resp.message.strip():
                s.fail("query refused without a reason")
            s.note("query: " + ("served" if resp.success else "refused"))
        time.sleep(rng.uniform(0.0, 0.2))


_GOOD_PARAMS: list[Callable[[random.Random], dict]] = [
    lambda r: {"overlay_alpha": round(r.random(), 3)},
    lambda r: {"publish_panoptic": r.random() < 0.5},
    lambda r: {"panoptic_min_area": r.choice([0, 0, 50, 5000])},
    lambda r: {"max_image_pixels": r.choice([100_000, 1000])},
    lambda r: {"segmenter_options": f"{{cost_ms: {r.choice([0.0, 5.0, 20.0, 300.0])}}}"},
    lambda r: {"vocabulary_timeout": r.choice([0.1, 0.3, 60.0, 60.0])},
]
_BAD_PARAMS: list[dict] = [
    {"overlay_alpha": float("nan")},
    {"segmenter_options": "2001-12-14"},
    {"segmenter_options": "{cost_ms: -1}"},
    {"device": "cpu\n"},
    {"max_image_pixels": 0},
    {"panoptic_min_area": -1},
]


def _param_actor(s: Soak, rng: random.Random, tid: int) -> None:
    while time.monotonic() < s.deadline:
        good = rng.random() < 0.6
        values = rng.choice(_GOOD_PARAMS)(rng) if good else rng.choice(_BAD_PARAMS)
        req = SetParameters.Request(parameters=[to_parameter_msg(k, v) for k, v in values.items()])
        resp = s.call(SetParameters, "set_parameters", req, "set_parameters")
        if resp is not None:
            r = resp.results[0]
            if good and not r.successful:
                s.fail(f"a valid parameter set was refused: {values} ({r.reason})")
            if not good and r.successful:
                s.fail(f"an invalid parameter set was accepted: {values}")
            if not r.successful and not r.reason.strip():
                s.fail(f"parameter set refused without a reason: {values}")
            s.note("param: " + ("set" if r.successful else "refused"))
        time.sleep(rng.uniform(0.05, 0.4))


_NEXT = {"active": ["deactivate"], "inactive": ["activate", "activate", "cleanup"], "unconfigured": ["configure"]}


def _lifecycle_actor(s: Soak, rng: random.Random, tid: int) -> None:
    while time.monotonic() < s.deadline:
        label = s.node.state(5.0)
        choices = _NEXT.get(label or "")
        if not choices:
            time.sleep(0.1)
            continue
        step = rng.choice(choices)
        teardown = step == "cleanup"
        with s.lock:
            s.transitions += 1
        if teardown:
            with s.lock:
                s.teardowns.append((time.monotonic(), float("inf")))
                slot = len(s.teardowns) - 1
        try:
            s.node.transition(step, timeout=CALL_TIMEOUT_S)
            s.note(f"transition {step}")
        except AssertionError:
            s.fail(f"transition {step} not answered within {CALL_TIMEOUT_S} s")
        finally:
            with s.lock:
                s.transitions += 1
            if teardown:
                with s.lock:
                    s.teardowns[slot] = (s.teardowns[slot][0], time.monotonic() + 1.0)
        time.sleep(rng.uniform(0.2, 1.5) if step != "deactivate" else rng.uniform(0.0, 0.3))


_FROZEN_READER = textwrap.dedent("""
    import sys, rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy, HistoryPolicy
    from sensor_msgs.msg import Image
    rclpy.init()
    n = rclpy.create_node("soak_frozen_reader")
    q = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
    seen = []
    def cb(m):
        if not seen:
            print("got", flush=True)
        seen.append(1)
    n.create_subscription(Image, sys.argv[1], cb, q)
    rclpy.spin(n)
""")


@pytest.fixture()
def frozen_reader(node: Target) -> Iterator[None]:
    """A reliable KEEP_ALL subscriber of the labels in its own process, frozen (SIGSTOP) once it has received a
    frame: it neither reads nor acknowledges for the rest of the soak."""
    proc = subprocess.Popen([sys.executable, "-c", _FROZEN_READER, f"{node.fqn}/semantic/labels"],
                            stdout=subprocess.PIPE, text=True)
    got = threading.Event()
    threading.Thread(target=lambda: (proc.stdout.readline(), got.set()), daemon=True).start()
    try:
        assert got.wait(60.0), "the frozen reader never received a frame"
        os.kill(proc.pid, signal.SIGSTOP)
        yield
    finally:
        proc.kill()
        proc.wait()


def test_random_interleavings_under_a_30hz_stream(node: Target, frozen_reader: None) -> None:
    master = random.Random(SEED)
    s = Soak(node, time.monotonic() + SOAK_S)
    actors = [_vocab_actor, _vocab_actor, _query_actor, _param_actor, _lifecycle_actor]
    threads = [threading.Thread(target=_guard(s, fn), args=(s, random.Random(master.random()), i), daemon=True)
               for i, fn in enumerate(actors)]
    with StateProbe(node) as probe:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            assert node.proc.alive(), f"the node died during the soak (seed {SEED}):\n{node.tail()}"
            time.sleep(0.5)
    for t in threads:
        t.join(CALL_TIMEOUT_S + 5)
    probe.check()
    assert not s.violations, f"seed {SEED}: " + "; ".join(s.violations[:10]) + f"\n{node.tail()}"
    node.set_params({"max_image_pixels": 100_000, "publish_panoptic": True, "panoptic_min_area": 0,
                     "vocabulary_timeout": 60.0, "segmenter_options": "{cost_ms: 5.0}"})
    node.bring_active()
    node.assert_healthy()
    resp = node.set_vocabulary(INITIAL)  # served at once, even if a request timed out just before the end
    assert resp.success, resp.message
    node.assert_healthy()
    print(f"soak {SOAK_S:.0f} s seed {SEED}: {sorted(s.counts.items())}; frames checked {node.checker.checked}")
    assert node.checker.checked >= 20, f"too few frames checked during the soak: {node.checker.checked}"


def _guard(s: Soak, fn: Callable[[Soak, random.Random, int], None]) -> Callable[[Soak, random.Random, int], None]:
    """An actor's own error (e.g. the node vanished under a call) becomes a violation, not a silent thread."""

    def run(soak: Soak, rng: random.Random, tid: int) -> None:
        try:
            fn(soak, rng, tid)
        except Exception as exc:  # noqa: BLE001
            s.fail(f"{fn.__name__}: {type(exc).__name__}: {exc}")

    return run
