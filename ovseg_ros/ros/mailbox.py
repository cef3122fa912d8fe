"""The one-slot "latest frame" mailbox between the image callback and the inference worker.

The callback never waits for the model: it puts the newest frame and returns. A frame still unprocessed
when the next one arrives is dropped (counted), so the worker always starts on the freshest frame and no
backlog (latency) can build up however slow the model is.
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
    """Thread-safe single slot; :meth:`put` replaces, :meth:`take` waits for a frame."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Optional[Frame] = None
        self._closed = False
        self._dropped_since_take = 0
        self.dropped_total = 0

    def put(self, frame: Frame) -> bool:
        """Store ``frame``; True when it replaced an unprocessed one (that one is dropped)."""
        with self._cond:
            replaced = self._frame is not None
            if replaced:
                self._dropped_since_take += 1
                self.dropped_total += 1
            self._frame = frame
            self._cond.notify()
            return replaced

    def take(self, timeout: Optional[float] = None) -> Optional[tuple[Frame, int]]:
        """Wait up to ``timeout`` s for a frame: (frame, frames dropped since the last take), or None."""
        with self._cond:
            if self._frame is None and not self._closed:
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
