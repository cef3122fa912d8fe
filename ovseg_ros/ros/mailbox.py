"""The one-slot "latest item" mailbox between pipeline stages (image callback -> inference -> publishing).

A producer never waits for its consumer: it puts the newest item and returns. An item still unprocessed
when the next one arrives is dropped (counted), so each stage always starts on the freshest item and no
backlog (latency) can build up however slow the next stage is. Several mailboxes can share one ``ready``
event so that one consumer (the inference thread of several cameras) waits on all of them at once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np


@dataclass(frozen=True)
class Frame:
    """A converted input frame."""

    header: Any  # std_msgs/Header, copied onto every output
    image: np.ndarray  # (H, W, 3) uint8 RGB
    received: float  # time.monotonic() when the message arrived


class LatestFrameMailbox:
    """Thread-safe single slot; :meth:`put` replaces, :meth:`take` waits for an item (a Frame or a result)."""

    def __init__(self, ready: Optional[threading.Event] = None) -> None:
        self._cond = threading.Condition()
        self._ready = ready
        self._frame: Optional[Any] = None
        self._closed = False
        self._dropped_since_take = 0
        self.dropped_total = 0

    def put(self, frame: Any) -> bool:
        """Store ``frame``; True when it replaced an unprocessed one (that one is dropped)."""
        with self._cond:
            replaced = self._frame is not None and not self._closed
            if replaced:
                self._dropped_since_take += 1
                self.dropped_total += 1
            if self._closed:
                return False  # a stopped stage takes nothing (the node is deactivating)
            self._frame = frame
            self._cond.notify()
        if self._ready is not None:
            self._ready.set()
        return replaced

    def take(self, timeout: Optional[float] = None) -> Optional[tuple[Any, int]]:
        """Wait up to ``timeout`` s for a frame: (frame, frames dropped since the last take), or None."""
        with self._cond:
            if self._frame is None and not self._closed and timeout != 0:
                self._cond.wait(timeout)
            if self._frame is None or self._closed:
                return None
            frame, dropped = self._frame, self._dropped_since_take
            self._frame, self._dropped_since_take = None, 0
            return frame, dropped

    def clear(self) -> None:
        """Forget the pending frame (not counted as dropped: the node is deactivating)."""
        with self._cond:
            self._frame = None
            self._dropped_since_take = 0

    def close(self) -> None:
        """Wake and stop any waiting :meth:`take`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False
            self._frame = None
            self._dropped_since_take = 0
