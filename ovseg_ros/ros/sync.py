"""Approximate-time pairing of processed frames with depth images (ROS-free; stamps in integer nanoseconds).

ROS's ``message_filters`` is not on the PyPI wheels, and its synchronisers pair *subscriptions*; here one side
is the node's own output (a frame that leaves inference long after its camera stamp), so a small matcher of
our own is used:

* a frame pairs with the depth image whose stamp is nearest to its own, if within ``slop``;
* depth images wait in a bounded, stamp-sorted buffer, pruned once no later frame can match them, the oldest
  evicted when full; out-of-order arrival is fine unless a depth image comes after a newer one has already
  decided a frame's pairing (as with message_filters, each stream is assumed nearly in order);
* a frame whose best depth may still arrive (every buffered depth is older than the frame, and no exact
  match) waits in a bounded pending list until a depth at or after its stamp arrives, or until ``max_wait``
  (wall time) has passed; it then takes the best candidate within ``slop`` or is counted unmatched.
  The nearest choice is thus the same as if all depth images had arrived first (depth arriving in order).

Jitter within ``slop`` pairs; dropped depth images leave frames unmatched (counted); nothing grows without
bound. A depth image may serve several frames (a colour camera faster than its depth stream).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Generic, Optional, TypeVar

D = TypeVar("D")
F = TypeVar("F")


@dataclass
class MatchStats:
    """Counters (read with :meth:`ApproximateTimeMatcher.stats`)."""

    matched: int = 0
    unmatched: int = 0  # frames for which no depth within slop was found
    depth_received: int = 0
    depth_unused: int = 0  # depth images pruned or evicted without serving any frame
    pending_overflow: int = 0  # frames resolved early because the pending list was full


class ApproximateTimeMatcher(Generic[F, D]):
    """Pairs frames (``F``) with depth items (``D``) by nearest stamp within ``slop_ns``. Thread-safe.

    ``push_depth`` and ``push_frame`` return the resolved pairs: ``(frame, depth)`` with ``depth`` None for a
    frame counted unmatched. ``now`` is a monotonic time in seconds (given by the caller, for testability).
    """

    def __init__(
        self, slop_ns: int, depth_capacity: int = 32, pending_capacity: int = 4, max_wait_s: float = 0.5
    ) -> None:
        if slop_ns < 0:
            raise ValueError(f"slop must be >= 0, got {slop_ns} ns")
        if depth_capacity < 1 or pending_capacity < 1:
            raise ValueError("capacities must be >= 1")
        self.slop_ns = int(slop_ns)
        self.depth_capacity = depth_capacity
        self.pending_capacity = pending_capacity
        self.max_wait_s = float(max_wait_s)
        self._lock = threading.Lock()
        self._stamps: list[int] = []  # sorted
        self._depth: list[tuple[D, bool]] = []  # (item, used), parallel to _stamps
        self._pending: list[tuple[int, F, float]] = []  # (stamp, frame, time queued)
        self._stats = MatchStats()

    # --- public --------------------------------------------------------------------------------------
    def push_depth(self, stamp_ns: int, item: D, now: float) -> list[tuple[F, Optional[D]]]:
        with self._lock:
            self._stats.depth_received += 1
            i = bisect.bisect_right(self._stamps, stamp_ns)
            self._stamps.insert(i, stamp_ns)
            self._depth.insert(i, (item, False))
            while len(self._stamps) > self.depth_capacity:
                self._drop_depth(0)
            return self._resolve_pending(now)

    def push_frame(self, stamp_ns: int, frame: F, now: float) -> list[tuple[F, Optional[D]]]:
        with self._lock:
            out = self._resolve_pending(now)
            if self._decided(stamp_ns):
                out.append(self._take(stamp_ns, frame))
                return out
            self._pending.append((stamp_ns, frame, now))
            while len(self._pending) > self.pending_capacity:
                stamp, old, _ = self._pending.pop(0)
                self._stats.pending_overflow += 1
                out.append(self._take(stamp, old))
            out += self._resolve_pending(now)  # max_wait 0: no waiting at all
            return out

    def poll(self, now: float) -> list[tuple[F, Optional[D]]]:
        """Resolve pending frames whose wait has expired (call it from time to time)."""
        with self._lock:
            return self._resolve_pending(now)

    def flush(self) -> list[tuple[F, Optional[D]]]:
        """Resolve every pending frame now with what is buffered (shutdown)."""
        with self._lock:
            out = [self._take(s, f) for s, f, _ in self._pending]
            self._pending = []
            return out

    def clear(self) -> None:
        with self._lock:
            self._stamps, self._depth, self._pending = [], [], []

    def stats(self) -> MatchStats:
        with self._lock:
            return MatchStats(**vars(self._stats))

    @property
    def buffered(self) -> int:
        with self._lock:
            return len(self._stamps)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # --- internals (lock held) -----------------------------------------------------------------------
    def _decided(self, stamp: int) -> bool:
        """True when no depth arriving later (in stamp order) can be nearer than what is buffered."""
        if not self._stamps:
            return False
        if self._stamps[-1] >= stamp:
            return True
        i = bisect.bisect_left(self._stamps, stamp)
        return i < len(self._stamps) and self._stamps[i] == stamp

    def _resolve_pending(self, now: float) -> list[tuple[F, Optional[D]]]:
        out = []
        keep = []
        for stamp, frame, queued in self._pending:
            if self._decided(stamp) or now - queued >= self.max_wait_s:
                out.append(self._take(stamp, frame))
            else:
                keep.append((stamp, frame, queued))
        self._pending = keep
        return out

    def _take(self, stamp: int, frame: F) -> tuple[F, Optional[D]]:
        """Pair ``frame`` with its nearest depth within slop (or None), then prune depth it has made useless."""
        best, best_dt = -1, self.slop_ns + 1
        i = bisect.bisect_left(self._stamps, stamp)
        for j in (i - 1, i):
            if 0 <= j < len(self._stamps):
                dt = abs(self._stamps[j] - stamp)
                if dt < best_dt:
                    best, best_dt = j, dt
        depth: Optional[D] = None
        if best >= 0:
            item, _ = self._depth[best]
            self._depth[best] = (item, True)
            depth = item
            self._stats.matched += 1
        else:
            self._stats.unmatched += 1
        # Frames come in (nearly) stamp order: depth older than this frame's window serves no later frame.
        cutoff = stamp - self.slop_ns
        while self._stamps and self._stamps[0] < cutoff and not self._older_pending(self._stamps[0]):
            self._drop_depth(0)
        return frame, depth

    def _older_pending(self, depth_stamp: int) -> bool:
        return any(s - self.slop_ns <= depth_stamp for s, _, _ in self._pending)

    def _drop_depth(self, index: int) -> None:
        _, used = self._depth.pop(index)
        self._stamps.pop(index)
        if not used:
            self._stats.depth_unused += 1
