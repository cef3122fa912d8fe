"""Harness of the fault-injection suite (issue 9): the real node under attack, observed from outside only.

Everything here talks to the node through its external interface (topics, services, parameters, lifecycle
services, signals, process exit), so the tests stay valid whatever the node's inside looks like.

* :class:`Camera` publishes a painted scene at 30 Hz with a unique stamp per frame.
* :class:`FrameChecker` matches every ``~/semantic/labels`` image to its ``~/info`` (same stamp) and so to the
  vocabulary revision it carries, then checks the labels against that revision: with the model-free
  ``color_key`` segmenter the exact expected labels are computed here by the core library (the oracle) from
  the frame that was sent; with a real model, every label must be a class id of that revision or its
  unlabeled id. It also checks that one revision never names two different vocabularies.
* :class:`Target` bundles the node process, its subscriptions, a persistent ``get_state`` client (so the
  1 s answer bound measures the node, not discovery) and :meth:`Target.assert_healthy`, the check run
  after every attack.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from ros_harness import Collector, NodeProcess, RosClient, image_array, latched, reliable, stamp_of

GET_STATE_BOUND_S = 1.0  # the bound: get_state answers within 1 s, always
SCENE_W, SCENE_H = 64, 48
STRIPES = 6  # painted with the key colours of class ids 0..5


# --- scenes ---------------------------------------------------------------------------------------------
def scene(variant: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB: vertical stripes in the key colours of class ids 0..5 (order rotated by
    ``variant``) over a black band, which is far from every key colour (unlabeled)."""
    from ovseg_ros.core.postprocess import make_palette

    keys = make_palette(STRIPES)
    img = np.zeros((SCENE_H, SCENE_W, 3), np.uint8)
    width = SCENE_W // STRIPES
    for s in range(STRIPES):
        img[: 2 * SCENE_H // 3, s * width: (s + 1) * width] = keys[(s + variant) % STRIPES]
    return img


SCENES = [scene(v) for v in range(3)]


def png_bytes(width: int, height: int, idat: bytes, color_type: int = 2) -> bytes:
    """A PNG whose IHDR says ``width`` x ``height`` (8-bit, ``color_type``) with ``idat`` as its data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def valid_blank_png(width: int, height: int) -> bytes:
    """A genuinely valid grayscale PNG of ``width`` x ``height`` (all zero: compresses ~1000:1)."""
    import zlib

    comp = zlib.compressobj(1)
    row = bytes(width + 1)  # filter byte 0 + pixels
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    return png_bytes(width, height, b"".join(parts), color_type=0)


# --- camera -----------------------------------------------------------------------------------------------
class Camera:
    """Publishes the painted scenes on ``topic`` at ``hz`` from a thread; remembers which scene each stamp
    carried (for the oracle)."""

    def __init__(self, client: RosClient, topic: str, hz: float = 30.0) -> None:
        from sensor_msgs.msg import Image

        self.pub = client.publisher(topic, Image, reliable(10))
        self.period = 1.0 / hz
        self.sent: dict[tuple[int, int], int] = {}  # stamp -> scene variant
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._n = 0

    def frame(self) -> Any:
        from stream_client import rgb_image_msg  # scripts/ (on sys.path through ros_harness)
        from builtin_interfaces.msg import Time

        self._n += 1
        variant = self._n % len(SCENES)
        stamp = Time(sec=2_000_000 + self._n // 1000, nanosec=(self._n % 1000) * 1000 + 7)
        msg = rgb_image_msg(SCENES[variant], stamp, "fault_camera")
        with self.lock:
            self.sent[(stamp.sec, stamp.nanosec)] = variant
        return msg

    def publish_one(self) -> None:
        self.pub.publish(self.frame())

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            try:
                self.publish_one()
            except Exception:  # noqa: BLE001  (the test context shuts down under us at the end)
                return
            next_t += self.period
            self._stop.wait(max(0.0, next_t - time.monotonic()))

    def start(self) -> "Camera":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="fault_camera", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def variant_of(self, stamp: tuple[int, int]) -> Optional[int]:
        with self.lock:
            return self.sent.get(stamp)


# --- the oracle -----------------------------------------------------------------------------------------
class ColorKeyOracle:
    """Expected labels of a painted scene for a vocabulary size, computed with the core's ``color_key``."""

    def __init__(self, options: Optional[dict] = None) -> None:
        self.options = dict(options or {})
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def expected(self, n: int, variant: int, unlabeled_id: int) -> np.ndarray:
        key = (n, variant)
        with self._lock:
            if key not in self._cache:
                from ovseg_ros.core.segmenter import build_segmenter
                from ovseg_ros.core.vocabulary import Vocabulary

                opts = {k: v for k, v in self.options.items() if k != "cost_ms"}
                seg = build_segmenter("color_key", "realtime", opts)
                state = seg.encode_vocabulary(Vocabulary.from_request([f"k{i}" for i in range(n)]))
                labels = seg.segment(SCENES[variant], state).labels
                self._cache[key] = labels
            labels = self._cache[key]
        return np.where(labels < 0, unlabeled_id, labels)


class FrameChecker:
    """Every labels frame must fit the vocabulary of the revision its ``~/info`` carries (see module doc)."""

    def __init__(self, labels: Collector, info: Collector, vocab: Collector, camera: Optional[Camera],
                 oracle: Optional[ColorKeyOracle]) -> None:
        self.labels, self.info, self.vocab = labels, info, vocab
        self.camera, self.oracle = camera, oracle
        self.known: dict[int, tuple[str, ...]] = {}  # revision -> class names (published or answered)
        self.ids: dict[int, tuple[int, ...]] = {}  # revision -> published class id of each name (issue 17)
        self.conflicts: list[str] = []
        self.checked = 0
        self.unmatched_revisions: set[int] = set()
        self._done: set[tuple[int, int]] = set()
        self._stamps: set[tuple[int, int]] = set()  # every labels stamp scanned for duplicates
        self._scanned = 0

    def learn(self, revision: int, names: tuple[str, ...], ids: Optional[tuple[int, ...]] = None) -> None:
        """Record what ``revision`` means (names, and the ids labels carry when known); a second, different
        meaning is a defect (issue 9, item 4)."""
        if ids is not None:
            self.ids.setdefault(revision, tuple(int(i) for i in ids))
        old = self.known.get(revision)
        if old is not None and old != names:
            self.conflicts.append(f"revision {revision} named two vocabularies: {old[:4]}... ({len(old)}) and "
                                  f"{names[:4]}... ({len(names)})")
        self.known.setdefault(revision, names)

    def _learn_published(self) -> None:
        for msg in self.vocab.snapshot():
            self.learn(int(msg.revision), tuple(c.name for c in msg.classes), tuple(c.id for c in msg.classes))

    def problems(self) -> list[str]:
        """Check all frames received so far (each once); the list of violations."""
        self._learn_published()
        infos = {stamp_of(m.header): m for m in self.info.snapshot()}
        out = list(self.conflicts)
        labels = self.labels.snapshot()
        seen: set[tuple[int, int]] = set()
        for lab in labels[self._scanned:]:
            key = stamp_of(lab.header)
            if key == (0, 0):
                continue  # an unstamped input: not ours to track
            if key in self._stamps or key in seen:
                out.append(f"frame {key} was published twice")
            seen.add(key)
        self._stamps |= seen
        self._scanned = len(labels)
        for lab in labels:
            key = stamp_of(lab.header)
            if key in self._done or key not in infos:
                continue  # checked already, or its info is not here yet
            revision = int(infos[key].vocabulary_revision)
            if revision in self.known and revision not in self.ids:
                continue  # its ids are not known yet (its ~/vocabulary is still to come)
            self._done.add(key)
            names = self.known.get(revision)
            if names is None:
                self.unmatched_revisions.add(revision)
                continue
            n = len(names)
            ids = np.asarray(self.ids[revision])  # stable class ids: not the positions
            encoding, unlabeled = ("mono8", 255) if int(ids.max()) < 255 else ("mono16", 65535)
            if lab.encoding != encoding:
                out.append(f"frame {key}: revision {revision} has ids up to {int(ids.max())} but labels are "
                           f"{lab.encoding}")
                continue
            arr = image_array(lab)
            bad = arr[~np.isin(arr, ids) & (arr != unlabeled)]
            if bad.size:
                out.append(f"frame {key}: labels {sorted(set(bad.tolist()))[:5]} outside revision {revision} "
                           f"({n} classes)")
                continue
            variant = self.camera.variant_of(key) if self.camera is not None else None
            if self.oracle is not None and variant is not None:
                positions = self.oracle.expected(n, variant, unlabeled)
                want = np.where(positions == unlabeled, unlabeled, ids[np.minimum(positions, n - 1)])
                if arr.shape != want.shape or not np.array_equal(arr, want):
                    diff = int((arr != want).sum()) if arr.shape == want.shape else -1
                    out.append(f"frame {key}: labels differ from color_key's for revision {revision} ({n} classes) "
                               f"in {diff} pixels")
                    continue
            self.checked += 1
        return out


# --- the node under test --------------------------------------------------------------------------------
class Target:
    """The node process plus its observers. ``options`` are its color_key options (None: not color_key)."""

    def __init__(self, client: RosClient, namespace: str, params: dict, workdir: Path,
                 color_key_options: Optional[dict] = None, camera: bool = True) -> None:
        from lifecycle_msgs.srv import GetState
        from sensor_msgs.msg import Image

        from ovseg_ros.msg import SegmentationInfo, Vocabulary

        self.client, self.ns, self.params = client, namespace, params
        self.proc = NodeProcess(namespace, params, workdir)
        self.fqn = self.proc.fqn
        self.labels = client.subscribe(f"{self.fqn}/semantic/labels", Image, reliable(200))
        self.info = client.subscribe(f"{self.fqn}/info", SegmentationInfo, reliable(200))
        self.vocab = client.subscribe(f"{self.fqn}/vocabulary", Vocabulary, latched())
        from diagnostic_msgs.msg import DiagnosticArray

        self.diagnostics = client.subscribe("/diagnostics", DiagnosticArray, reliable(50))
        self.camera = Camera(client, f"{namespace}/image") if camera else None
        oracle = ColorKeyOracle(color_key_options) if color_key_options is not None else None
        self.checker = FrameChecker(self.labels, self.info, self.vocab, self.camera, oracle)
        self._get_state = client.node.create_client(GetState, f"{self.fqn}/get_state")
        self.state_latencies: list[float] = []

    # --- waiting for startup -----------------------------------------------------------------------
    def wait_active(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.alive(), f"node exited during startup:\n{self.tail()}"
            if self.vocab.wait_for(timeout=0.5) is not None and self.state(timeout=10.0) == "active":
                if self.camera is not None:
                    self.camera.start()
                return
        raise AssertionError(f"node never became active:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.proc.output()[-n:]

    # --- lifecycle -----------------------------------------------------------------------------------
    def state(self, timeout: float = GET_STATE_BOUND_S) -> Optional[str]:
        """The lifecycle state label, or None when no answer came within ``timeout``."""
        from lifecycle_msgs.srv import GetState

        if not self._get_state.wait_for_service(timeout_sec=10.0):
            return None
        done = threading.Event()
        t0 = time.monotonic()
        future = self._get_state.call_async(GetState.Request())
        future.add_done_callback(lambda _f: done.set())
        ok = done.wait(timeout)
        self.state_latencies.append(time.monotonic() - t0)
        if not ok:
            future.cancel()
            return None
        return future.result().current_state.label

    def assert_state_answers(self) -> str:
        label = self.state(GET_STATE_BOUND_S)
        assert label is not None, f"get_state not answered within {GET_STATE_BOUND_S} s\n{self.tail()}"
        return label

    def transition(self, label: str, timeout: float = 60.0) -> bool:
        try:
            return self.client.change_state(self.fqn, label, timeout)
        except TimeoutError as exc:
            raise AssertionError(f"{label}: {exc}\n{self.tail()}") from exc

    def bring_active(self, timeout: float = 60.0) -> None:
        """Back to active from wherever the node is (unconfigured, inactive)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            label = self.state(10.0)
            if label == "active":
                return
            step = {"unconfigured": "configure", "inactive": "activate"}.get(label or "")
            if step is not None:
                self.transition(step, timeout)
            else:
                time.sleep(0.2)  # a transition in progress
        raise AssertionError(f"could not bring the node back to active:\n{self.tail()}")

    # --- services and parameters -------------------------------------------------------------------------
    def srv(self, name: str) -> str:
        return f"{self.fqn}/{name}"

    def set_vocabulary_async(self, classes: list[str]) -> tuple[Any, threading.Event]:
        from ovseg_ros.srv import SetVocabulary

        cli = self.client.node.create_client(SetVocabulary, self.srv("set_vocabulary"))
        assert cli.wait_for_service(timeout_sec=10.0), "set_vocabulary not available"
        done = threading.Event()
        future = cli.call_async(SetVocabulary.Request(classes=list(classes)))
        future.ovseg_client = cli  # type: ignore[attr-defined]  (kept alive with the future)

        def finished(_f: Any) -> None:
            future.answered_at = time.monotonic()  # type: ignore[attr-defined]
            done.set()

        future.add_done_callback(finished)
        return future, done

    def set_vocabulary(self, classes: list[str], timeout: float = 120.0) -> Any:
        from ovseg_ros.srv import SetVocabulary

        resp = self.client.call(SetVocabulary, self.srv("set_vocabulary"),
                                SetVocabulary.Request(classes=list(classes)), timeout)
        if resp.success:
            self.checker.learn(int(resp.revision), tuple(c.split(",")[0].strip() for c in classes),
                               tuple(resp.class_ids))
        return resp

    def set_vocabulary_when_free(self, classes: list[str], timeout: float = 90.0) -> Any:
        """set_vocabulary, retried while the node answers "busy" (a change still encoding, possibly one
        abandoned by a reconfigure)."""
        deadline = time.monotonic() + timeout
        while True:
            resp = self.set_vocabulary(classes, timeout)
            if resp.success or "busy" not in resp.message or time.monotonic() > deadline:
                return resp
            time.sleep(0.5)

    def vocabulary_in_use(self) -> Any:
        from ovseg_ros.srv import GetVocabulary

        return self.client.call(GetVocabulary, self.srv("get_vocabulary"), GetVocabulary.Request(), 30.0).vocabulary

    def query(self, texts: list[str], timeout: float = 60.0) -> Any:
        from ovseg_ros.srv import Query

        return self.client.call(Query, self.srv("query"), Query.Request(texts=list(texts)), timeout)

    def set_params(self, values: dict[str, Any], timeout: float = 10.0) -> list[Any]:
        """``ros2 param set``: one SetParameters call; the per-parameter results (successful, reason)."""
        from rcl_interfaces.srv import SetParameters

        req = SetParameters.Request(parameters=[to_parameter_msg(k, v) for k, v in values.items()])
        return list(self.client.call(SetParameters, self.srv("set_parameters"), req, timeout).results)

    def get_param(self, name: str) -> Any:
        from rcl_interfaces.srv import GetParameters

        resp = self.client.call(GetParameters, self.srv("get_parameters"), GetParameters.Request(names=[name]), 30.0)
        return parameter_value(resp.values[0])

    def diag(self, predicate: Callable[[dict], bool] = lambda kv: True, timeout: float = 10.0) -> Optional[dict]:
        """Key/values of the next /diagnostics status of this node satisfying ``predicate`` (None: timeout)."""
        def values(msg: Any) -> list[dict]:
            return [{v.key: v.value for v in s.values} | {"_message": s.message}
                    for s in msg.status if self.fqn in s.name]

        msg = self.diagnostics.wait_for(lambda m: any(predicate(kv) for kv in values(m)), timeout, new_only=True)
        return None if msg is None else next(kv for kv in values(msg) if predicate(kv))

    # --- the check after every attack ------------------------------------------------------------------
    def assert_healthy(self, timeout: float = 20.0) -> None:
        """Alive; get_state within 1 s; active; new frames arrive; every frame fits its revision."""
        assert self.proc.alive(), f"the node died (exit {self.proc.proc.returncode}):\n{self.tail()}"
        label = self.assert_state_answers()
        assert label == "active", f"state {label!r} after the attack, expected active\n{self.tail()}"
        if self.camera is not None:
            got = self.labels.wait_for(lambda m: True, timeout=timeout, new_only=True)
            assert got is not None, f"no new frames within {timeout} s after the attack\n{self.tail()}"
            self.info.wait_for(lambda m: stamp_of(m.header) == stamp_of(got.header), timeout=5.0)
        self.assert_frames_consistent()
        assert self.proc.alive(), f"the node died:\n{self.tail()}"
        assert "Traceback" not in self.proc.output(), self.tail()

    def assert_frames_consistent(self) -> None:
        problems = self.checker.problems()
        assert not problems, "frames that do not fit their vocabulary revision:\n" + "\n".join(problems[:10])

    def close(self) -> Optional[int]:
        if self.camera is not None:
            self.camera.stop()
        self.client.node.destroy_client(self._get_state)
        for col in (self.labels, self.info, self.vocab, self.diagnostics):
            self.client.unsubscribe(col)
        return self.proc.stop()


class StateProbe:
    """Asks get_state every ``period`` s from a thread while an attack runs; every answer must come in 1 s."""

    def __init__(self, node: Target, period: float = 0.25) -> None:
        self.node, self.period = node, period
        self.missed: list[float] = []
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            if self.node.state(GET_STATE_BOUND_S) is None:
                self.missed.append(time.monotonic() - t0)
            else:
                self.answered += 1
            self._stop.wait(self.period)

    def __enter__(self) -> "StateProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def check(self) -> None:
        assert not self.missed, f"get_state went unanswered for > {GET_STATE_BOUND_S} s {len(self.missed)} times"
        assert self.answered > 0


# --- parameter messages -------------------------------------------------------------------------------
def to_parameter_msg(name: str, value: Any) -> Any:
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue

    v = ParameterValue()
    if isinstance(value, bool):
        v.type, v.bool_value = ParameterType.PARAMETER_BOOL, value
    elif isinstance(value, int):
        v.type, v.integer_value = ParameterType.PARAMETER_INTEGER, value
    elif isinstance(value, float):
        v.type, v.double_value = ParameterType.PARAMETER_DOUBLE, value
    elif isinstance(value, str):
        v.type, v.string_value = ParameterType.PARAMETER_STRING, value
    elif isinstance(value, (list, tuple)):
        v.type, v.string_array_value = ParameterType.PARAMETER_STRING_ARRAY, [str(x) for x in value]
    else:
        raise TypeError(f"no parameter type for {value!r}")
    return Parameter(name=name, value=v)


def parameter_value(v: Any) -> Any:
    from rcl_interfaces.msg import ParameterType

    return {
        ParameterType.PARAMETER_BOOL: lambda: v.bool_value,
        ParameterType.PARAMETER_INTEGER: lambda: v.integer_value,
        ParameterType.PARAMETER_DOUBLE: lambda: v.double_value,
        ParameterType.PARAMETER_STRING: lambda: v.string_value,
        ParameterType.PARAMETER_STRING_ARRAY: lambda: list(v.string_array_value),
    }.get(v.type, lambda: None)()


def wait_until(predicate: Callable[[], bool], timeout: float, period: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period)
    return predicate()


def rss_peak_mib(pid: int) -> float:
    """Peak resident memory (VmHWM) of ``pid``, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


# --- node parameters and a restartable node -------------------------------------------------------------
INITIAL = ["k0", "k1", "k2", "k3"]
COLOR_KEY_OPTIONS = {"cost_ms": 5.0}


def color_key_params(**overrides: Any) -> dict:
    """segment_node parameters with the model-free color_key segmenter (labels are a known function of
    the image), the compressed input on, and a small pixel limit."""
    params = {
        "segmenter": "color_key",
        "device": "cpu",
        "cache_dir": "",
        "vocabulary": list(INITIAL),
        "segmenter_options": "{cost_ms: 5.0}",
        "diagnostics_period": 0.5,
        "max_image_pixels": 100_000,
        "use_compressed": True,
    }
    params.update(overrides)
    return params


class Restartable:
    """One node shared by a module's tests, started again (new namespace) when an attack killed it or left
    it unable to return to active: one failure does not cascade into the next tests."""

    def __init__(self, client: RosClient, namespace: str, params: dict, workdir: Path,
                 color_key_options: Optional[dict] = COLOR_KEY_OPTIONS) -> None:
        self.client, self.namespace, self.params, self.workdir = client, namespace, params, workdir
        self.options = color_key_options
        self.target: Optional[Target] = None
        self.starts = 0

    def get(self) -> Target:
        t = self.target
        if t is not None and t.proc.alive():
            try:
                t.bring_active(timeout=30.0)
                return t
            except AssertionError:
                pass
        if t is not None:
            t.close()
        self.starts += 1
        ns = self.namespace if self.starts == 1 else f"{self.namespace}_r{self.starts}"
        t = Target(self.client, ns, self.params, self.workdir / f"run{self.starts}", self.options)
        self.target = t
        t.wait_active()
        return t

    def close(self) -> Optional[int]:
        return None if self.target is None else self.target.close()


def shared_node_fixtures(params: Callable[[Any], dict], folder: str, **options: Any) -> tuple[Any, Any]:
    """The module fixtures ``shared`` (one :class:`Restartable` node per test module, closed at the end) and
    ``node`` (that node, back to active or restarted for each test). ``params(request)`` gives the node's
    parameters; ``options`` go to :class:`Restartable`."""
    import pytest

    @pytest.fixture(scope="module")
    def shared(request: Any, client: RosClient, namespace: str, tmp_path_factory: Any) -> Any:
        r = Restartable(client, namespace, dict(params(request)), tmp_path_factory.mktemp(folder), **options)
        try:
            yield r
        finally:
            r.close()

    @pytest.fixture
    def node(shared: Restartable) -> Target:
        return shared.get()

    return shared, node
