"""Vocabulary and query services of segment_node: encoding off the executor, one generation counter, atomic swap.

What the pipeline segments with is one immutable :class:`Binding` (model generation, segmenter, vocabulary
state), swapped as a single reference:

* ``generation`` grows at every configure and cleanup. A vocabulary encoded for an older generation (the model
  was replaced while it encoded) is dropped at swap time and the caller is told so: embeddings of an old model
  never reach a frame.
* Revisions are handed out at swap time under one lock, so two different vocabularies never share a revision.
  With a :class:`~.vocabulary_store.VocabularyStore` each new revision is saved (with its vocabulary and ids)
  before it is published, so revisions also never repeat across restarts and a respawn restores it.
* Class ids are assigned at swap time too (:func:`~ovseg_ros.core.class_ids.assign_class_ids`): names that stay
  keep their id, removed ids are quarantined; the ids travel inside the vocabulary of the binding, so every
  frame is encoded with the ids of the revision it was computed with.
* The binding lives in the node's :class:`~ovseg_ros.ros.gate.OutputGate`. A swap is a compare-and-swap there:
  the latched ``~/vocabulary`` (and ``~/label_info``) of the new revision is published and the binding replaced
  in one step under the gate's lock, only if the model generation it was encoded for is still current, and its
  embeddings are placed on the model's *current* device (a model move in between is not undone, and does not
  undo the swap). No frame of a new revision precedes its vocabulary; frames of the old state are dropped.

Encoding runs on a background thread, one job at a time. A second change while one runs is answered "busy" at
once. The ROS services are coroutines (``srv_*_async``): while the job runs, the request waits as an rclpy task,
holding no executor thread; a watcher thread bounds the wait by ``vocabulary_timeout`` (monotonic time) and wakes
the executor when the answer is ready, and a transition or shutdown releases it at once. The blocking forms
(``srv_set_vocabulary``, ``srv_query``) run the same body for in-process callers and tests. A request past the
timeout cancels its job (it stops at its next batch and no longer counts as running), so the next request is
served, not answered "busy"; at most ``MAX_STOPPING`` cancelled jobs may still be stopping beside a live one (work
that ignores cancellation cannot pile up threads). The same runner serves ``~/query``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Optional

import numpy as np

from ..core.cancel import cancellable
from ..core.class_ids import Assignment, ClassIdError, ClassIdTable, assign_class_ids
from ..core.models import select_device
from ..core.vocabulary import MAX_CLASSES, Vocabulary, VocabularyError, check_query_texts
from . import messages
from .conversions import ConversionError, numpy_to_image
from .gate import OutputGate
from .guard import reason, sanitize
from .outputs import vocabulary_message


@dataclass(frozen=True)
class Binding:
    """What a frame is computed with; compared by identity when its result is published."""

    generation: int
    segmenter: Any
    state: Any  # the segmenter's VocabularyState (its vocabulary carries the revision)
    segmenter_name: str
    model_identity: str
    #: One thread at a time runs the model's image path (pipeline inference, ~/query): torch.compile'd blocks
    #: (``compile_blocks``) must not be entered, or compiled for a new shape, by two threads at once. Shared by
    #: every binding of one model generation (``dataclasses.replace`` keeps it).
    model_lock: Any = dataclasses.field(default_factory=threading.Lock, compare=False)

    @property
    def vocabulary(self) -> Vocabulary:
        return self.state.vocabulary


@dataclass(frozen=True)
class VocabularyHooks:
    """What the vocabulary service needs from its node, given when it is built."""

    #: publish the latched ``~/vocabulary`` and ``~/label_info`` of a binding (called under the gate's lock)
    announce: Callable[[Binding, Any], None] = lambda binding, stamp: None
    #: the newest camera frame while the node is active, else None (query without an image)
    latest_frame: Callable[[], Any] = lambda: None
    #: sensor_msgs/Image -> RGB array (a query's own image); raises ConversionError
    convert: Callable[[Any], np.ndarray] = lambda msg: _no_converter(msg)
    #: why a vocabulary cannot be used by the node's outputs (e.g. too many classes for mono8), or None
    check_vocabulary: Callable[[Vocabulary], Optional[str]] = lambda vocabulary: None
    #: the node's clock as a builtin_interfaces/Time
    now: Callable[[], Any] = lambda: None


class _Job:
    def __init__(self, kind: str, detail: str) -> None:
        self.kind, self.detail = kind, detail
        self.started = time.monotonic()
        self.done = threading.Event()
        self.cancel = threading.Event()  # set when the model it works for is replaced
        self.result: Any = None
        self.error: Optional[BaseException] = None


#: How long a watcher keeps waking the executor for the coroutine it completed (see JobRunner.wait_async).
WAKE_RETRY_S = 0.05
WAKE_RETRIES = 100

#: Cancelled jobs of one kind that may still be stopping while a new one runs. Cooperative work (the text
#: encoders check between batches) stops within a batch; work that cannot be interrupted (one inference of a
#: query) runs to its end, so without a bound, requests that keep timing out would pile up threads on the CPU.
MAX_STOPPING = 1


#: A service body (see VocabularyService): yields (job, timeout) at most once, is sent why the wait ended ("" when
#: the job finished), returns the response.
ServiceBody = Generator[tuple[_Job, float], str, Any]


class JobRunner:
    """At most one live background job per kind (plus MAX_STOPPING cancelled ones still stopping); callers wait
    with a bound and can be released."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._stopping: dict[str, list[_Job]] = {}
        self.release = threading.Event()  # set by transitions/shutdown: waiting callers return at once

    def start(self, kind: str, detail: str, fn: Callable[[], Any], device: Any = None) -> tuple[Optional[_Job], str]:
        """(job, "") or (None, why busy). The job's thread selects ``device`` (the model's) first."""
        with self._lock:
            running = self._jobs.get(kind)
            # A cancelled job no longer blocks: it stops at its next batch and its result is never used.
            if running is not None and not running.done.is_set() and not running.cancel.is_set():
                age = time.monotonic() - running.started
                return None, f"busy: {running.detail} has been running for {age:.1f} s; try again when it is done"
            stopping = [j for j in self._stopping.get(kind, []) if not j.done.is_set() and j is not running]
            if running is not None and not running.done.is_set():
                stopping.append(running)
            self._stopping[kind] = stopping
            if len(stopping) > MAX_STOPPING:
                age = time.monotonic() - min(j.started for j in stopping)
                return None, (f"busy: {len(stopping)} cancelled requests are still stopping (the oldest started "
                              f"{age:.1f} s ago); try again shortly")
            job = _Job(kind, detail)
            self._jobs[kind] = job

        def run() -> None:
            try:
                select_device(device)
                with cancellable(job.cancel):
                    job.result = fn()
            except BaseException as exc:  # noqa: BLE001  (handed to the waiting caller)
                job.error = exc
            finally:
                job.done.set()

        threading.Thread(target=run, name=f"ovseg_{kind}", daemon=True).start()
        return job, ""

    def cancel_all(self) -> None:
        """Cancel every running job (their model is being replaced) and release their callers."""
        self.release.set()
        with self._lock:
            for job in self._jobs.values():
                job.cancel.set()

    def wait(self, job: _Job, timeout: float) -> str:
        """"" when the job finished, else why the caller stopped waiting. A job waited for in vain is cancelled:
        its result would never be used, so it must not make the next request "busy"."""
        deadline = time.monotonic() + timeout
        while not job.done.wait(min(0.05, max(timeout, 0.001))):
            if self.release.is_set():
                job.cancel.set()
                return "the node is changing state (reconfigure, cleanup or shutdown)"
            if time.monotonic() > deadline:
                job.cancel.set()
                return f"not finished within {timeout:g} s (vocabulary_timeout); it was cancelled"
        return ""

    async def wait_async(self, job: _Job, timeout: float, executor: Any) -> str:
        """:meth:`wait` without holding the caller's executor thread: a watcher thread waits (the same bound,
        release and cancellation) and completes an rclpy future that the calling coroutine awaits. Without an
        executor (an in-process call outside one) it waits in place."""
        if executor is None:
            return self.wait(job, timeout)
        from rclpy.task import Future

        outcome: Future = Future(executor=executor)
        resumed = threading.Event()

        def watch() -> None:
            outcome.set_result(self.wait(job, timeout))
            # rclpy resumes a task awaiting a future when its executor wakes up; a wake-up that meets the task
            # while a previous resume is still running is spent on nothing, so wake it until it has resumed.
            for _ in range(WAKE_RETRIES):
                try:
                    executor.wake()
                except Exception:  # noqa: BLE001  (the executor is shut down: nobody waits any more)
                    return
                if resumed.wait(WAKE_RETRY_S):
                    return

        threading.Thread(target=watch, name=f"ovseg_{job.kind}_wait", daemon=True).start()
        try:
            return str(await outcome)
        finally:
            resumed.set()


class VocabularyService:
    """Owns the current :class:`Binding`; answers set/get vocabulary and query."""

    def __init__(self, node: Any, gate: OutputGate, hooks: VocabularyHooks) -> None:
        self.node = node
        self.gate = gate
        self.hooks = hooks
        self._lock = threading.Lock()  # generation and revision counters; taken before the gate's lock
        self.generation = 0
        self.revision = 0  # last revision handed out; grows across configure cycles
        self.jobs = JobRunner()
        # Class ids and persistence (set at configure by the node: seed()).
        self.id_table: Optional[ClassIdTable] = None  # the ids of the current revision; kept across configures
        self.id_limit = MAX_CLASSES  # ids must be below it (255 with nav2_compatible: mono8)
        self.store: Any = None  # a VocabularyStore, or None (cache_dir empty)
        self.configured_key = ""  # fingerprint of the configured vocabulary, saved with the runtime one


    @property
    def binding(self) -> Optional[Binding]:
        """The current binding (held by the gate)."""
        return self.gate.binding

    @property
    def stamp(self) -> Any:
        return self.gate.stamp

    def seed(self, store: Any, revision: int, table: Optional[ClassIdTable], id_limit: int, configured_key: str
             ) -> None:
        """Before install(): continue revisions and ids from a previous run (:mod:`.vocabulary_store`)."""
        with self._lock:
            self.store, self.id_limit, self.configured_key = store, id_limit, configured_key
            self.revision = max(self.revision, revision)
            if table is not None and (self.id_table is None or table.revision > self.id_table.revision):
                self.id_table = table

    # --- model lifetime (transitions) ----------------------------------------------------------------
    def install(self, segmenter: Any, state: Any, segmenter_name: str, model_identity: str) -> Binding:
        """A new model generation with its first vocabulary (configure)."""
        with self._lock:
            self.generation += 1
            self.jobs.release.clear()
            revision = self.revision + 1
            try:
                state, table = self._with_ids(state, revision)
            except ClassIdError as exc:  # nothing of the old generation is in flight any more: renumber
                self.node.get_logger().warning(f"class ids renumbered from 0 at configure: {exc}")
                self.id_table = None
                state, table = self._with_ids(state, revision)
            self.revision = revision
            binding = Binding(self.generation, segmenter, state, segmenter_name, model_identity)
            self._commit_ids(binding.vocabulary, table)
            self.gate.install(binding, self.hooks.now(), self.hooks.announce)
        return binding

    def move(self, device: Any) -> bool:
        """Move the model and its vocabulary state to ``device`` through the gate (compare-and-swap: a
        vocabulary swapped in during the move is moved too, never reverted). True when done."""
        return self.gate.move(device, _move_segmenter, _move_state,
                              lambda binding, state: dataclasses.replace(binding, state=state))

    def drop(self) -> None:
        """No model any more (cleanup, shutdown): running jobs are cancelled, waiting callers released, late
        results dropped."""
        self.jobs.cancel_all()
        with self._lock:
            self.generation += 1
            self.gate.install(None, None, self.hooks.announce)

    def _with_ids(self, state: Any, revision: int) -> tuple[Any, ClassIdTable]:
        """``state`` with revision ``revision`` and the class ids following the current table (caller holds
        ``_lock``). Raises ClassIdError when the ids would run out (nothing changes then)."""
        vocab = state.vocabulary
        assignment: Assignment = assign_class_ids(self.id_table, vocab.names, revision, self.id_limit)
        for warning in assignment.warnings:
            self.node.get_logger().warning(warning)
        vocab = vocab.with_revision(revision).with_ids(assignment.table.ids)
        return dataclasses.replace(state, vocabulary=vocab), assignment.table

    def _commit_ids(self, vocabulary: Vocabulary, table: ClassIdTable) -> None:
        """Make ``table`` the current ids and save revision ``vocabulary.revision`` (caller holds ``_lock``). Call
        it before the revision is published: a crash can then never have published an unsaved revision."""
        self.id_table = table
        if self.store is not None:
            try:
                self.store.save(vocabulary, table, self.configured_key)
            except OSError as exc:
                self.node.get_logger().warning(
                    f"could not persist vocabulary revision {vocabulary.revision} to {self.store.path}: "
                    f"{exc.strerror or type(exc).__name__}; it is in use but will not survive a restart")


    # --- services ------------------------------------------------------------------------------------
    # Each body is a generator: it yields (job, timeout) once when it has started its job, receives why the wait
    # ended ("" when the job finished) and returns the response. The blocking and the coroutine forms differ only
    # in how they wait, so every refusal, message and check is written once.
    def srv_set_vocabulary(self, req: Any, resp: Any) -> Any:
        """Blocking form (in-process callers); the ROS service uses :meth:`srv_set_vocabulary_async`."""
        return self._drive(self._set_vocabulary(req, resp))

    async def srv_set_vocabulary_async(self, req: Any, resp: Any) -> Any:
        return await self._drive_async(self._set_vocabulary(req, resp))

    def srv_query(self, req: Any, resp: Any) -> Any:
        """Blocking form (in-process callers); the ROS service uses :meth:`srv_query_async`."""
        return self._drive(self._query(req, resp))

    async def srv_query_async(self, req: Any, resp: Any) -> Any:
        return await self._drive_async(self._query(req, resp))

    def _drive(self, body: ServiceBody) -> Any:
        try:
            job, timeout = next(body)
            body.send(self.jobs.wait(job, timeout))
        except StopIteration as done:
            return done.value
        raise RuntimeError("a service body waits for one job only")

    async def _drive_async(self, body: ServiceBody) -> Any:
        try:
            job, timeout = next(body)
            body.send(await self.jobs.wait_async(job, timeout, getattr(self.node, "executor", None)))
        except StopIteration as done:
            return done.value
        raise RuntimeError("a service body waits for one job only")

    def _set_vocabulary(self, req: Any, resp: Any) -> ServiceBody:
        resp.success, resp.revision = False, self.revision
        binding = self.binding
        if binding is None:
            resp.message = "the node is not configured (no model loaded)"
            return self._refused(resp)
        try:
            vocab = Vocabulary.from_request(
                list(req.classes), list(req.descriptions), [bool(b) for b in req.is_thing], source="service")
        except VocabularyError as exc:
            resp.message = reason(exc)
            return self._refused(resp)
        max_classes = int(self.node.get_parameter("max_vocabulary_classes").value)
        if len(vocab) > max_classes:
            resp.message = (f"{len(vocab)} classes requested; at most {max_classes} (max_vocabulary_classes) "
                            "are encoded per request")
            return self._refused(resp)
        why = self.hooks.check_vocabulary(vocab)
        if why:
            resp.message = why
            return self._refused(resp)
        segmenter, generation = binding.segmenter, binding.generation
        job, busy = self.jobs.start("vocabulary", f"encoding a vocabulary of {len(vocab)} classes",
                                    lambda: segmenter.encode_vocabulary(vocab), segmenter.device)
        if job is None:
            resp.message = busy
            return self._refused(resp)
        waited = yield job, float(self.node.get_parameter("vocabulary_timeout").value)
        if waited:
            resp.message = f"vocabulary not applied: {waited}; the vocabulary in use is unchanged"
            return self._refused(resp)
        if job.error is not None:
            text = reason(job.error)
            encoding_failed = not isinstance(job.error, VocabularyError)
            resp.message = f"could not encode the vocabulary: {text}" if encoding_failed else text
            return self._refused(resp)
        with self._lock:
            current = self.binding
            if current is None or current.generation != generation:
                resp.message = ("vocabulary not applied: the model was reconfigured while it was encoded (its "
                                "embeddings belong to the old model); send the request again")
                resp.revision = self.revision
                return self._refused(resp)
            revision = self.revision + 1
            try:
                state, table = self._with_ids(job.result, revision)
            except ClassIdError as exc:
                resp.message = f"vocabulary not applied: {reason(exc)}; the vocabulary in use is unchanged"
                resp.revision = self.revision
                return self._refused(resp)
            # The generation cannot change while _lock is held (install/drop take it): the swap below succeeds,
            # so the ids are committed (and saved) before the revision is published.
            self.revision = revision
            self._commit_ids(state.vocabulary, table)

            def make(current: Binding) -> Binding:
                # The embeddings go where the model is now (a move may have run while they were encoded).
                return dataclasses.replace(current, state=_move_state(state, _device_of(current.segmenter)))

            if self.gate.swap(binding, make, self.hooks.now(), self.hooks.announce) is None:  # see above: cannot be
                resp.message = "vocabulary not applied: the model was reconfigured; send the request again"
                return self._refused(resp)
        n = len(vocab)
        preview = ", ".join(vocab.names[:8]) + (", ..." if n > 8 else "")
        encoding, _ = messages.label_encoding(state.vocabulary.id_bound)
        resp.success = True
        resp.message = f"vocabulary revision {revision}: {n} classes ({preview}); labels {encoding}"
        resp.class_ids = list(state.vocabulary.ids)
        resp.revision = revision
        self.node.get_logger().info(sanitize(resp.message))  # class names: untrusted text
        return resp

    def _refused(self, resp: Any) -> Any:
        self.node.get_logger().warning(sanitize(f"set_vocabulary refused: {resp.message}"))
        return resp

    def srv_get_vocabulary(self, req: Any, resp: Any) -> Any:
        binding, stamp = self.binding, self.stamp
        if binding is not None:
            resp.vocabulary = self.vocabulary_msg(binding, stamp)
        return resp

    def vocabulary_msg(self, binding: Binding, stamp: Any) -> Any:
        return vocabulary_message(binding, stamp)

    def _query(self, req: Any, resp: Any) -> ServiceBody:
        resp.success = False
        binding = self.binding
        if binding is None:
            resp.message = "the node is not configured (no model loaded)"
            return resp
        texts = list(req.texts)
        max_texts = int(self.node.get_parameter("max_query_texts").value)
        if not texts:
            resp.message = "the query has no texts"
            return resp
        if len(texts) > max_texts:
            resp.message = f"{len(texts)} texts; at most {max_texts} (max_query_texts) per query"
            return resp
        try:
            check_query_texts(texts)
        except VocabularyError as exc:
            resp.message = reason(exc)
            return resp
        if req.image.width == 0 and req.image.height == 0:
            frame = self.hooks.latest_frame()
            if frame is None:
                resp.message = (
                    "no frame has been received yet and the request has no image: publish a frame first or fill "
                    "the request's image" if self.gate.active else
                    "the node is inactive (camera frames from before the deactivate are not used) and the "
                    "request has no image: activate the node or fill the request's image")
                return resp
            header, image = frame.header, frame.image
        else:
            try:
                header, image = req.image.header, self.hooks.convert(req.image)
            except ConversionError as exc:
                resp.message = f"request image refused: {reason(exc)}"
                return resp
        job, busy = self.jobs.start("query", f"a query of {len(texts)} texts",
                                    lambda: _locked(binding.model_lock, lambda: binding.segmenter.query(image, texts)),
                                    binding.segmenter.device)
        if job is None:
            resp.message = busy
            return resp
        waited = yield job, float(self.node.get_parameter("vocabulary_timeout").value)
        if waited:
            resp.message = f"query abandoned: {waited}"
            return resp
        if job.error is not None:
            text = reason(job.error)
            resp.message = text if isinstance(job.error, VocabularyError) else f"query failed: {text}"
            return resp
        result = job.result
        if not self.gate.same_model(binding):
            resp.message = "query abandoned: the model was replaced while it ran; send the request again"
            return resp
        resp.header = header
        resp.masks = [numpy_to_image(np.where(m, 255, 0).astype(np.uint8), "mono8", header) for m in result.masks]
        resp.scores = [float(s) for s in result.scores]
        resp.success = True
        resp.message = f"{len(texts)} masks on a {image.shape[1]}x{image.shape[0]} frame"
        return resp


def _no_converter(msg: Any) -> np.ndarray:
    raise ConversionError("request images cannot be converted here (no converter set)")


def _locked(lock: Any, fn: Callable[[], Any]) -> Any:
    with lock:
        return fn()


def _device_of(segmenter: Any) -> Any:
    return getattr(segmenter, "device", None)


def _move_segmenter(segmenter: Any, device: Any) -> None:
    """Move the model unless it is there already (compared as strings: "cuda" vs "cuda:0" do move)."""
    if str(_device_of(segmenter)) != str(device):
        segmenter.to(device)
        release = getattr(segmenter, "release_device_caches", None)  # shared caches left on the old device
        if callable(release):
            release()


def _move_state(state: Any, device: Any) -> Any:
    """``state`` with its tensors on ``device`` (``state`` itself when nothing moves or no device is known)."""
    if device is None or not hasattr(state, "to"):
        return state
    return state.to(device)


def _with_revision(state: Any, revision: int) -> Any:
    return dataclasses.replace(state, vocabulary=state.vocabulary.with_revision(revision))
