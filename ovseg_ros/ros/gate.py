"""The output gate of segment_node: the one place every output passes, and the one lock that orders them.

One rule - *nothing of an old binding, nothing while inactive* - is kept here and nowhere else. The gate holds
three things under one lock:

* the **active** flag (set at the end of activate, cleared first thing in deactivate/cleanup/shutdown);
* the **current binding** (:class:`~ovseg_ros.ros.vocabulary_service.Binding`: model generation, segmenter,
  vocabulary state), compared by identity;
* the **order** of outputs against changes of the binding.

Every publisher goes through it:

* :meth:`emit` - per-frame outputs and clouds from every path (the frame's own, a late depth image, a timed-out
  pending frame): ``fn`` runs only while ``binding`` is current and the node active;
* :meth:`same_model` - query answers: given only if the model that computed them is still the current one;
* :meth:`swap` - a vocabulary change: the latched ``~/vocabulary``/``~/label_info`` of the new binding go out
  and the binding is replaced in one step, and only if the binding it was computed from is still current
  (compare-and-swap: a swap never overwrites a move or another swap);
* :meth:`move` - a device move: the model moves outside the lock (hundreds of ms), then the state is moved and
  installed only if the binding is still the one that was moved; a vocabulary that was swapped in meanwhile is
  moved too (re-read, moved again) instead of being reverted.

Publishing inside the lock is what makes the order exact (a frame of revision N never follows LabelInfo N+1).
The price is that a publish that blocks holds the lock: with the output QoS (KEEP_LAST, depth 2) a writer never
waits for a reader to acknowledge - DDS replaces the oldest unacknowledged sample - so a subscriber that stops
reading costs no wait (tests/ros/test_gate.py; figures from benchmarks/bench_slow_subscriber.py in
docs/benchmarks.md, "A reliable reader that stops reading").
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")


class OutputGate:
    """Publish lock + active flag + current binding (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = False
        self._binding: Any = None
        self._stamp: Any = None  # stamp of the latched vocabulary of the current binding

    # --- reads (no lock: single reference reads) --------------------------------------------------------------
    @property
    def binding(self) -> Any:
        return self._binding

    @property
    def stamp(self) -> Any:
        return self._stamp

    @property
    def active(self) -> bool:
        return self._active

    def current(self, binding: Any) -> bool:
        """Whether outputs of ``binding`` may go out now (a hint; :meth:`emit` decides under the lock)."""
        return self._active and binding is self._binding

    def same_model(self, binding: Any) -> bool:
        """Whether ``binding``'s model generation is still the current one (a query answer does not depend on
        the vocabulary, only on the model; it is a service reply, so it is given while inactive too)."""
        with self._lock:
            return self._binding is not None and self._binding.generation == binding.generation

    def locked(self) -> bool:
        """Whether the gate's lock is held (tests check that publishing happens under it)."""
        return self._lock.locked()

    # --- the active flag ------------------------------------------------------------------------------------
    def open(self) -> None:
        with self._lock:
            self._active = True

    def close(self) -> None:
        """Outputs stop at once: after this returns no ``emit`` runs its function (one in progress has ended)."""
        with self._lock:
            self._active = False

    # --- outputs --------------------------------------------------------------------------------------------
    def emit(self, binding: Any, fn: Callable[[], T], *, when_inactive: bool = False) -> tuple[bool, Optional[T]]:
        """Run ``fn`` under the lock if ``binding`` is current and the gate open; (ran, result).

        ``when_inactive``: run it while inactive too (a query answer computed on a request's own image is an
        answer to a service call, not a topic output; the binding must still be current).
        """
        with self._lock:
            if binding is not self._binding or not (self._active or when_inactive):
                return False, None
            return True, fn()

    # --- binding changes ------------------------------------------------------------------------------------
    def install(self, binding: Any, stamp: Any, announce: Callable[[Any, Any], None]) -> None:
        """Make ``binding`` current unconditionally (configure, cleanup with ``None``), announcing it first."""
        with self._lock:
            try:
                if binding is not None:
                    announce(binding, stamp)
            finally:
                self._binding, self._stamp = binding, stamp

    def swap(self, expected: Any, make: Callable[[Any], Any], stamp: Any,
             announce: Callable[[Any, Any], None]) -> Optional[Any]:
        """Compare-and-swap: if the current binding is ``expected``'s generation, install ``make(current)``.

        ``make`` receives the binding current *now* (which may be ``expected`` moved to another device) and
        returns the new one, e.g. with the new vocabulary state placed on the model's current device. Returns
        the installed binding, or None when the model generation changed (the caller says why).
        """
        with self._lock:
            current = self._binding
            if current is None or current.generation != expected.generation:
                return None
            new = make(current)
            try:
                announce(new, stamp)
            finally:
                self._binding, self._stamp = new, stamp
            return new

    def move(self, device: Any, move_model: Callable[[Any, Any], None],
             move_state: Callable[[Any, Any], Any], replace: Callable[[Any, Any], Any],
             attempts: int = 3) -> bool:
        """Move the current binding's model and vocabulary state to ``device``; True when done (or nothing to do).

        The slow part (``move_model(segmenter, device)``) runs outside the lock so that outputs and swaps go on;
        the state is then moved and installed under the lock only if the binding is still the one read before
        the move. A swap in between is not reverted: its binding is re-read and its state moved (the model is
        already there, so the retry is quick). A swap installs its state on the model's current device itself.
        """
        for _ in range(attempts):
            binding = self._binding
            if binding is None:
                return True
            move_model(binding.segmenter, device)
            state = move_state(binding.state, device)
            with self._lock:
                if self._binding is binding:
                    self._binding = replace(binding, state)
                    return True
                if self._binding is None or self._binding.generation != binding.generation:
                    return True  # the model itself was replaced: nothing of it to move any more
        return False
