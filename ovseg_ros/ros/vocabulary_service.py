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
* The latched ``~/vocabulary`` (and ``~/label_info``) of the new revision is published *before* the swap, under
  the node's publish lock: no frame of a new revision precedes its vocabulary, and frames computed with the old
  state are dropped, never published after it.

Encoding runs on a background thread, one job at a time. A second change while one runs is answered "busy" at
once; the calling executor thread only waits, bounded by ``vocabulary_timeout``, and a transition or shutdown
releases it at once. The same runner serves ``~/query``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from ..core.cancel import cancellable
from ..core.class_ids import Assignment, ClassIdError, ClassIdTable, assign_class_ids
from ..core.vocabulary import MAX_CLASSES, Vocabulary, VocabularyError, check_query_texts
from . import messages
from .conversions import ConversionError, numpy_to_image
from .guard import reason, sanitize


@dataclass(frozen=True)
class Binding:
    """What a frame is computed with; compared by identity when its result is published."""

    generation: int
    segmenter: Any
    state: Any  # the segmenter's VocabularyState (its vocabulary carries the revision)
    segmenter_name: str
    model_identity: str

    @property
    def vocabulary(self) -> Vocabulary:
        return self.state.vocabulary


class _Job:
    def __init__(self, kind: str, detail: str) -> None:
        self.kind, self.detail = kind, detail
        self.started = time.monotonic()
        self.done = threading.Event()
        self.cancel = threading.Event()  # set when the model it works for is replaced
        self.result: Any = None
        self.error: Optional[BaseException] = None


class JobRunner:
    """At most one background job per kind; callers wait with a bound and can be released."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self.release = threading.Event()  # set by transitions/shutdown: waiting callers return at once

    def start(self, kind: str, detail: str, fn: Callable[[], Any]) -> tuple[Optional[_Job], str]:
        """(job, "") or (None, why busy)."""
        with self._lock:
            running = self._jobs.get(kind)
            # A cancelled job no longer blocks: it stops at its next batch and its result is never used.
            if running is not None and not running.done.is_set() and not running.cancel.is_set():
                age = time.monotonic() - running.started
                return None, f"busy: {running.detail} has been running for {age:.1f} s; try again when it is done"
            job = _Job(kind, detail)
            self._jobs[kind] = job

        def run() -> None:
            try:
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
        """"" when the job finished, else why the caller stopped waiting."""
        deadline = time.monotonic() + timeout
        while not job.done.wait(0.05):
            if self.release.is_set():
                return "the node is changing state (reconfigure, cleanup or shutdown)"
            if time.monotonic() > deadline:
                return f"not finished within {timeout:.0f} s (vocabulary_timeout)"
        return ""


class VocabularyService:
    """Owns the current :class:`Binding`; answers set/get vocabulary and query."""

    def __init__(self, node: Any, publish_lock: threading.Lock) -> None:
        self.node = node
        self.publish_lock = publish_lock
        self._lock = threading.Lock()  # generation, revision and binding changes
        self.generation = 0
        self.revision = 0  # last revision handed out; grows across configure cycles
        self.binding: Optional[Binding] = None
        self.stamp: Any = None
        self.jobs = JobRunner()
        self.latest_frame: Callable[[], Any] = lambda: None
        self.convert: Callable[[Any], np.ndarray] = _no_converter  # the node sets its image conversion
        self.publish_latched: Callable[[Binding, Any], None] = lambda binding, stamp: None
        self.check_vocabulary: Callable[[Vocabulary], Optional[str]] = lambda v: None
        # Class ids and persistence (set at configure by the node: seed()).
        self.id_table: Optional[ClassIdTable] = None  # the ids of the current revision; kept across configures
        self.id_limit = MAX_CLASSES  # ids must be below it (255 with nav2_compatible: mono8)
        self.store: Any = None  # a VocabularyStore, or None (cache_dir empty)
        self.configured_key = ""  # fingerprint of the configured vocabulary, saved with the runtime one

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
            self._swap(binding)
        return binding

    def rebind(self, state: Any) -> None:
        """Same generation and revision, another state object (the model moved to another device)."""
        with self._lock:
            if self.binding is not None:
                self.binding = dataclasses.replace(self.binding, state=state)

    def drop(self) -> None:
        """No model any more (cleanup, shutdown): running jobs are cancelled, waiting callers released, late
        results dropped."""
        self.jobs.cancel_all()
        with self._lock:
            self.generation += 1
            self.binding = None

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

    def _swap(self, binding: Binding) -> None:
        """Publish the latched vocabulary of ``binding``, then make it current (caller holds ``_lock``)."""
        stamp = self.node.get_clock().now().to_msg()
        with self.publish_lock:
            try:
                self.publish_latched(binding, stamp)
            finally:
                self.binding, self.stamp = binding, stamp

    # --- services ------------------------------------------------------------------------------------
    def srv_set_vocabulary(self, req: Any, resp: Any) -> Any:
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
        why = self.check_vocabulary(vocab)
        if why:
            resp.message = why
            return self._refused(resp)
        segmenter, generation = binding.segmenter, binding.generation
        job, busy = self.jobs.start("vocabulary", f"encoding a vocabulary of {len(vocab)} classes",
                                    lambda: segmenter.encode_vocabulary(vocab))
        if job is None:
            resp.message = busy
            return self._refused(resp)
        waited = self.jobs.wait(job, float(self.node.get_parameter("vocabulary_timeout").value))
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
            try:
                state, table = self._with_ids(job.result, self.revision + 1)
            except ClassIdError as exc:
                resp.message = f"vocabulary not applied: {reason(exc)}; the vocabulary in use is unchanged"
                resp.revision = self.revision
                return self._refused(resp)
            self.revision += 1
            self._commit_ids(state.vocabulary, table)
            self._swap(dataclasses.replace(current, state=state))
            revision = self.revision
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
        prompts = None
        try:
            prompts = binding.segmenter.describe_prompts(binding.state)
        except Exception:  # noqa: BLE001  (optional introspection; names are the fallback)
            prompts = None
        return messages.vocabulary_msg(binding.vocabulary, stamp, binding.segmenter_name, binding.model_identity,
                                       prompts)

    def srv_query(self, req: Any, resp: Any) -> Any:
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
            frame = self.latest_frame()
            if frame is None:
                resp.message = ("no frame has been received yet and the request has no image: publish a frame "
                                "first or fill the request's image")
                return resp
            header, image = frame.header, frame.image
        else:
            try:
                header, image = req.image.header, self.convert(req.image)
            except ConversionError as exc:
                resp.message = f"request image refused: {reason(exc)}"
                return resp
        job, busy = self.jobs.start("query", f"a query of {len(texts)} texts",
                                    lambda: binding.segmenter.query(image, texts))
        if job is None:
            resp.message = busy
            return resp
        waited = self.jobs.wait(job, float(self.node.get_parameter("vocabulary_timeout").value))
        if waited:
            resp.message = f"query abandoned: {waited}"
            return resp
        if job.error is not None:
            text = reason(job.error)
            resp.message = text if isinstance(job.error, VocabularyError) else f"query failed: {text}"
            return resp
        result = job.result
        resp.header = header
        resp.masks = [numpy_to_image(np.where(m, 255, 0).astype(np.uint8), "mono8", header) for m in result.masks]
        resp.scores = [float(s) for s in result.scores]
        resp.success = True
        resp.message = f"{len(texts)} masks on a {image.shape[1]}x{image.shape[0]} frame"
        return resp


def _no_converter(msg: Any) -> np.ndarray:
    raise ConversionError("request images cannot be converted here (no converter set)")


def _with_revision(state: Any, revision: int) -> Any:
    return dataclasses.replace(state, vocabulary=state.vocabulary.with_revision(revision))
