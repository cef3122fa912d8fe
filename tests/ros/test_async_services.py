"""``~/set_vocabulary`` and ``~/query`` answer as coroutines: a request waiting for its encoding or query holds
no executor thread.

The node here is spun by ONE executor thread (rclpy's SingleThreadedExecutor). Before the services were
coroutines, a set_vocabulary waiting for a slow encoding held that thread for the whole encoding (up to
``vocabulary_timeout``): no frame, no /diagnostics, no lifecycle service in between. Now, while encodings and a
query run on their job threads:

* camera frames keep being segmented and published, /diagnostics keeps coming, get_state answers at once;
* further requests are answered "busy" at once;
* the waiting request is answered as soon as its job ends, also without other traffic to wake the executor;
* the timeout (monotonic) and its cancellation work as before: the next request is served, not "busy";
* an exception inside the coroutine becomes a refusal, never escapes into the executor.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import pytest
from ros_harness import RosClient, require_ros_or_skip

require_ros_or_skip()

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from ovseg_ros.ros.segment_node import SegmentNode  # noqa: E402
from ovseg_ros.srv import Query, SetVocabulary  # noqa: E402
from test_ros_pipeline import CLASSES, painted  # noqa: E402

OK = TransitionCallbackReturn.SUCCESS


@pytest.fixture(scope="module")
def node(ros_session: None, namespace: str) -> Iterator[SegmentNode]:
    """A color_key node spun by a single executor thread."""
    from rclpy.executors import SingleThreadedExecutor

    params = {"segmenter": "color_key", "cache_dir": "", "vocabulary": CLASSES, "diagnostics_period": 0.3,
              "vocabulary_timeout": 10.0}
    n = SegmentNode(namespace=namespace, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    ex = SingleThreadedExecutor()
    ex.add_node(n)
    thread = threading.Thread(target=ex.spin, daemon=True)
    thread.start()
    try:
        assert n.trigger_configure() == OK
        assert n.trigger_activate() == OK
        yield n
    finally:
        ex.shutdown(timeout_sec=2.0)
        n.destroy_node()
        thread.join(timeout=5.0)


def _slow(segmenter: Any, name: str, seconds: float) -> Any:
    """Make ``segmenter.<name>`` take ``seconds`` longer (test-only instance attribute); returns the undo."""
    inner = getattr(segmenter, name)

    def slow(*args: Any) -> Any:
        time.sleep(seconds)
        return inner(*args)

    setattr(segmenter, name, slow)
    return lambda: segmenter.__dict__.pop(name, None)


def _call_in_thread(client: RosClient, srv: type, name: str, req: Any, out: list) -> threading.Thread:
    def run() -> None:
        out.append(client.call(srv, name, req, timeout=30))
        out.append(time.monotonic())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_waiting_request_holds_no_executor_thread(node: SegmentNode, client: RosClient, namespace: str) -> None:
    base = node.get_fully_qualified_name()
    labels = client.subscribe(f"{base}/semantic/labels", Image, qos_profile_sensor_data)
    diagnostics = client.subscribe("/diagnostics", DiagnosticArray)
    camera = client.publisher(f"{namespace}/image", Image)
    client.call(SetVocabulary, f"{base}/set_vocabulary", SetVocabulary.Request(classes=CLASSES))  # discovery
    undo = _slow(node.segmenter, "encode_vocabulary", 3.0)
    first: list[Any] = []
    try:
        started = time.monotonic()
        t = _call_in_thread(client, SetVocabulary, f"{base}/set_vocabulary",
                            SetVocabulary.Request(classes=["floor", "door"]), first)
        time.sleep(0.5)
        job = node.vocab.jobs._jobs["vocabulary"]
        assert not job.done.is_set()
        labels.clear()
        diagnostics.clear()
        t0 = time.monotonic()
        busy = client.call(SetVocabulary, f"{base}/set_vocabulary", SetVocabulary.Request(classes=["wall"]),
                           timeout=10)
        assert not busy.success and busy.message.startswith("busy:"), busy.message
        assert client.lifecycle_state(base, timeout=5) == "active"
        assert time.monotonic() - t0 < 1.5, "the one executor thread must answer while an encoding waits"
        while time.monotonic() - started < 2.2:  # frames while the encoding still runs
            camera.publish(painted(1, "cam"))
            time.sleep(1 / 30)
        assert not job.done.is_set(), "the window above must lie inside the encoding"
        assert len(labels.snapshot()) >= 5, "frames must be segmented while a set_vocabulary waits"
        assert len([m for m in diagnostics.snapshot() if any(base in s.name for s in m.status)]) >= 2, \
            "/diagnostics must keep coming while a set_vocabulary waits"
        assert job.done.wait(5.0)
        ended = time.monotonic()
        t.join(10)
        assert first and first[0].success, first
        assert first[1] - ended < 0.7, f"answered {first[1] - ended:.2f} s after the encoding ended"
        assert node.vocab.binding.vocabulary.names == ["floor", "door"]
    finally:
        undo()
        client.unsubscribe(labels)
        client.unsubscribe(diagnostics)
        assert client.call(SetVocabulary, f"{base}/set_vocabulary", SetVocabulary.Request(classes=CLASSES)).success


def test_timeout_cancels_and_the_next_request_is_served(node: SegmentNode, client: RosClient) -> None:
    base = node.get_fully_qualified_name()
    before = node.vocab.binding.vocabulary.revision
    node.set_parameters([Parameter("vocabulary_timeout", value=0.3)])
    undo = _slow(node.segmenter, "encode_vocabulary", 1.5)
    try:
        t0 = time.monotonic()
        resp = client.call(SetVocabulary, f"{base}/set_vocabulary", SetVocabulary.Request(classes=["floor", "x"]))
        assert time.monotonic() - t0 < 1.2
        assert not resp.success and "not finished within 0.3 s" in resp.message and "cancelled" in resp.message
        undo()
        node.set_parameters([Parameter("vocabulary_timeout", value=10.0)])
        nxt = client.call(SetVocabulary, f"{base}/set_vocabulary", SetVocabulary.Request(classes=["floor", "y"]))
        assert nxt.success, nxt.message
        assert node.vocab.binding.vocabulary.revision > before
        time.sleep(1.5)  # the cancelled encoding ends: never installed
        assert node.vocab.binding.vocabulary.names == ["floor", "y"]
    finally:
        undo()
        node.set_parameters([Parameter("vocabulary_timeout", value=10.0)])
        assert client.call(SetVocabulary, f"{base}/set_vocabulary", SetVocabulary.Request(classes=CLASSES)).success


def test_query_waits_as_a_coroutine(node: SegmentNode, client: RosClient) -> None:
    from test_ros_pipeline import painted as make

    base = node.get_fully_qualified_name()
    undo = _slow(node.segmenter, "query", 1.5)
    out: list[Any] = []
    try:
        req = Query.Request(texts=["floor", "wall"], image=make(1, "cam"))
        t = _call_in_thread(client, Query, f"{base}/query", req, out)
        time.sleep(0.4)
        t0 = time.monotonic()
        assert client.lifecycle_state(base, timeout=5) == "active"
        again = client.call(Query, f"{base}/query", req, timeout=10)
        assert not again.success and again.message.startswith("busy:"), again.message
        assert time.monotonic() - t0 < 1.0, "the executor must answer while a query runs"
        t.join(10)
        assert out and out[0].success and len(out[0].masks) == 2, out
    finally:
        undo()


def test_an_exception_in_the_coroutine_is_a_refusal(node: SegmentNode, client: RosClient) -> None:
    base = node.get_fully_qualified_name()
    hooks = node.vocab.hooks

    def boom(vocabulary: Any) -> Any:
        raise RuntimeError("injected")

    original = hooks.check_vocabulary
    object.__setattr__(hooks, "check_vocabulary", boom)  # frozen dataclass: test-only
    try:
        resp = client.call(SetVocabulary, f"{base}/set_vocabulary", SetVocabulary.Request(classes=["a", "b"]))
        assert not resp.success and "internal error" in resp.message and "injected" in resp.message
    finally:
        object.__setattr__(hooks, "check_vocabulary", original)
    assert client.lifecycle_state(base, timeout=5) == "active"
    assert client.call(SetVocabulary, f"{base}/set_vocabulary", SetVocabulary.Request(classes=CLASSES)).success


def test_the_watcher_wakes_an_idle_executor(ros_session: None) -> None:
    """With nothing else to wake the executor (no node, no timer), a coroutine awaiting a job is resumed when the
    job ends: the watcher wakes the executor (rclpy resumes a waiting task only on a wake-up)."""
    from rclpy.executors import SingleThreadedExecutor

    from ovseg_ros.ros.vocabulary_service import JobRunner

    runner = JobRunner()
    ex = SingleThreadedExecutor()
    release = threading.Event()
    job, _ = runner.start("vocabulary", "a test job", lambda: release.wait(5.0) and "encoded")
    assert job is not None

    async def request() -> str:
        return await runner.wait_async(job, 10.0, ex)

    task = ex.create_task(request)
    thread = threading.Thread(target=ex.spin, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        assert not task.done()
        release.set()
        t0 = time.monotonic()
        while not task.done() and time.monotonic() - t0 < 3.0:
            time.sleep(0.01)
        assert task.done() and task.result() == "", "the awaiting coroutine must resume when its job ends"
        assert time.monotonic() - t0 < 0.5
        assert job.result == "encoded"
    finally:
        ex.shutdown(timeout_sec=2.0)
        thread.join(5.0)
