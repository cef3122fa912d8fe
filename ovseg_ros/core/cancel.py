"""Cooperative cancellation of long core work (text encoding) that runs in a worker thread.

The ROS layer encodes vocabularies in background jobs. When the model they were started for is replaced
(cleanup, reconfigure, shutdown), their result can never be used; a job runs inside :func:`cancellable` and the
core calls :func:`check` between batches, so an abandoned job stops at its next batch instead of holding the
CPU (and the vocabulary service) until it would have finished. Outside a scope :func:`check` does nothing.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional

_scope: ContextVar[Optional[threading.Event]] = ContextVar("ovseg_cancel", default=None)


class Cancelled(Exception):
    """The work was abandoned: its result would belong to a model that is gone."""


@contextmanager
def cancellable(event: threading.Event) -> Iterator[None]:
    """Run the body so that :func:`check` raises :class:`Cancelled` once ``event`` is set."""
    token = _scope.set(event)
    try:
        yield
    finally:
        _scope.reset(token)


def check() -> None:
    """Raise :class:`Cancelled` if the enclosing :func:`cancellable` scope was cancelled."""
    event = _scope.get()
    if event is not None and event.is_set():
        raise Cancelled("abandoned: the model it was started for was replaced")
