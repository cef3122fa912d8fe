"""Every ROS callback is an entry point: nothing raised inside one may escape into the executor.

rclpy re-raises an exception from any callback (subscription, timer, service, parameter, transition) out of
``spin()``, which ends the process. Each callback of the node is therefore wrapped here: an exception becomes
a refusal with a reason (a service reply, a failed parameter set, a FAILURE transition, a counted and logged
frame error), and the node keeps serving its last good state.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
import traceback
from collections import Counter
from typing import Any, Callable, Optional, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
LOG_THROTTLE_S = 5.0
#: Longest text of an exception or untrusted value quoted in a log line or a reply.
MAX_REASON_CHARS = 400


def sanitize(text: Any) -> str:
    """``text`` with every non-printable character escaped (``\x1b[2J`` -> ``\\x1b[2J``; newlines, bidi
    overrides, zero-width characters alike): untrusted text - class names, frame ids, encodings, reasons -
    must never drive the operator's terminal or forge log lines. Used by :func:`reason` and every logging
    path that quotes input; never raises."""
    try:
        text = text if isinstance(text, str) else str(text)
    except Exception:  # noqa: BLE001
        return "<unprintable>"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class _SanitizingFilter(logging.Filter):
    """Escapes control characters in Python log records (the core logs through ``logging``: LLM endpoint
    errors, cache warnings, with text from outside)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            clean = sanitize(message)
            if clean != message:
                record.msg, record.args = clean, ()
        except Exception:  # noqa: BLE001  (a broken record is still logged as it is)
            pass
        return True


_FILTER = _SanitizingFilter()


def sanitize_python_logging() -> None:
    """Install :func:`sanitize` on Python logging's output (the last-resort stderr handler and the root
    logger's handlers present now); idempotent."""
    for handler in (logging.lastResort, *logging.getLogger().handlers):
        if handler is not None and _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


def reason(exc: BaseException) -> str:
    """The exception's message (KeyError's quotes dropped), or its type name when it has none; control
    characters escaped (:func:`sanitize`); bounded."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    try:
        out = str(text)
    except Exception:  # noqa: BLE001  (a __str__ that raises)
        out = ""
    out = sanitize(out or type(exc).__name__)
    return out if len(out) <= MAX_REASON_CHARS else out[: MAX_REASON_CHARS - 3] + "..."


class ErrorLog:
    """Callback failures: counted per callback, the last one kept with its time (for diagnostics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.last: str = ""
        self.last_time: float = 0.0
        #: faults outside our callbacks that were recovered from without effect (e.g. rclpy's InvalidHandle when
        #: a transition destroys an entity the executor was about to wait on): counted, never a warning
        self.recovered: Counter[str] = Counter()

    def record_recovered(self, where: str) -> None:
        with self._lock:
            self.recovered[where] += 1

    def record(self, where: str, text: str) -> None:
        with self._lock:
            self.counts[where] += 1
            self.last = sanitize(f"{where}: {text}")
            self.last_time = time.monotonic()

    def snapshot(self) -> tuple[int, str, Optional[float]]:
        """(total count, last error, its age in seconds or None)."""
        with self._lock:
            age = time.monotonic() - self.last_time if self.last else None
            return sum(self.counts.values()), self.last, age


def _report(node: Any, errors: ErrorLog, where: str, exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {reason(exc)}"
    where = sanitize(where)
    errors.record(where, text)
    try:
        node.get_logger().error(f"{where} failed: {text}", throttle_duration_sec=LOG_THROTTLE_S)
        node.get_logger().debug("\n".join(sanitize(line) for line in traceback.format_exc().splitlines()))
    except Exception:  # noqa: BLE001  (logging during shutdown)
        pass
    return text


def guarded(node: Any, errors: ErrorLog, where: str, fn: F) -> F:
    """Wrap a subscription/timer/event callback: exceptions are counted and logged, never raised."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001  (the point of this wrapper)
            _report(node, errors, where, exc)
            return None

    return wrapper  # type: ignore[return-value]


ServiceCallback = Callable[[Any, Any], Any]


def guarded_service(node: Any, errors: ErrorLog, where: str, fn: ServiceCallback) -> ServiceCallback:
    """Wrap a service callback: an exception becomes ``success = False`` and ``message`` (when the type has them).
    A coroutine callback (``async def``, run by the executor as a task) gets a coroutine wrapper."""

    def failed(response: Any, exc: Exception) -> Any:
        text = _report(node, errors, where, exc)
        try:
            if hasattr(response, "success"):
                response.success = False
            if hasattr(response, "message"):
                response.message = f"internal error, request not applied: {text}"
        except Exception:  # noqa: BLE001
            pass
        return response

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def coroutine_wrapper(request: Any, response: Any) -> Any:
            try:
                return await fn(request, response)
            except Exception as exc:  # noqa: BLE001
                return failed(response, exc)

        return coroutine_wrapper

    @functools.wraps(fn)
    def wrapper(request: Any, response: Any) -> Any:
        try:
            return fn(request, response)
        except Exception as exc:  # noqa: BLE001
            return failed(response, exc)

    return wrapper


def guarded_transition(
    node: Any, errors: ErrorLog, where: str, fn: Callable[..., Any], failure: Any
) -> Callable[..., Any]:
    """Wrap a lifecycle transition: an exception becomes ``failure`` (FAILURE/ERROR) with the reason logged."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            _report(node, errors, where, exc)
            return failure

    return wrapper
