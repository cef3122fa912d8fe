"""Approximate-time pairing of processed frames with depth images (ROS-free; stamps in integer nanoseconds).

ROS's ``message_filters`` is not on the PyPI wheels, and its synchronisers pair *subscriptions*; here one side
is the node's own output (a frame that leaves inference long after its camera stamp), so a small matcher of
our own is used:

* a frame pairs with the depth image whose stamp is nearest to its own, if within ``slop``;
* depth images wait in a stamp-sorted buffer bounded in images *and bytes* (``max_bytes``: a 4096x4096 32FC1
  image is 64 MiB), pruned once no later frame can match them. Over the bound, the image farthest from the
  newest frame's stamp goes first (before any frame: from the newest arrival's), so a depth stream whose
  stamps run ahead of colour, or a few images stamped far in the future, never evict the image the next
  frame needs;
* a frame whose best depth may still arrive (every buffered depth is older than the frame, and no exact
  match) waits in a bounded pending list until a depth at or after its stamp arrives, or until ``max_wait``
  (monotonic wall time: it bounds how long a cloud is held back, whatever the ROS clock does) has passed; it
  then takes the best candidate within ``slop`` or is counted unmatched;
* **time going backwards** (a bag played in a loop, a simulator reset, an NTP step): a stream whose stamp goes
  back by more than ``rewind`` (1 s) starts a new timeline: frames of the old timeline still waiting are
  resolved with what it buffered, its depth images (stamped after the new one by more than ``rewind``) are
  dropped, and the rewind is counted per stream. :meth:`reset` does the same for a jump of the ROS clock
  itself (the node's jump callback), dropping everything. A frame stamped more than ``rewind`` after every
  buffered depth image (a frame of the old timeline after the depth stream looped) prunes nothing.

Why a frame found no depth is named (:attr:`MatchStats.last_unmatched_cause`): no depth at all, depth stamps
running ahead of or behind colour (estimated from ``stamp - arrival time`` of each stream, which does not
depend on the inference latency), an image evicted by the buffer bound, or simply none within ``slop``.
A depth image may serve several frames (a colour camera faster than its depth stream).
"""

from __future__ import annotations

import bisect
import statistics
import threading
from collections import deque
from dataclasses import dataclass
from typing import Generic, Optional, TypeVar

D = TypeVar("D")
F = TypeVar("F")

NS = 1_000_000_000
#: Default bound of the buffered depth images in bytes (about 200 VGA 16UC1 images, 6 s at 30 Hz).
DEFAULT_MAX_BYTES = 128 * 1024 * 1024
#: A stamp this much older than its stream's newest one starts a new timeline (see the module docstring).
DEFAULT_REWIND_NS = NS
_OFFSET_SAMPLES = 16
_EVICTED_MEMORY = 64


@dataclass
class MatchStats:
    """Counters (read with :meth:`ApproximateTimeMatcher.stats`)."""

    matched: int = 0
    unmatched: int = 0  # frames for which no depth within slop was found
    depth_received: int = 0
    depth_unused: int = 0  # depth images pruned or evicted without serving any frame
    depth_evicted: int = 0  # depth images dropped by the image/byte bound (a subset of the drops)
    pending_overflow: int = 0  # frames resolved early because the pending list was full
    depth_rewinds: int = 0  # depth stamps went backwards by more than ``rewind``
    frame_rewinds: int = 0  # frame stamps went backwards by more than ``rewind``
    resets: int = 0  # reset() calls (ROS clock jumps)
    reset_dropped: int = 0  # frames waiting at a reset, dropped (they belong to the old timeline)
    buffered: int = 0
    buffered_bytes: int = 0
    #: median of (depth stamp - arrival) minus median of (frame stamp - reception), seconds; None unknown
    depth_offset_s: Optional[float] = None
    last_unmatched_cause: str = ""


class ApproximateTimeMatcher(Generic[F, D]):
    """Pairs frames (``F``) with depth items (``D``) by nearest stamp within ``slop_ns``. Thread-safe.

    ``push_depth`` and ``push_frame`` return the resolved pairs: ``(frame, depth)`` with ``depth`` None for a
    frame counted unmatched. ``now`` is a monotonic time in seconds (given by the caller, for testability).
    """

    def __init__(
        self,
        slop_ns: int,
        depth_capacity: int = 256,
        pending_capacity: int = 4,
        max_wait_s: float = 0.5,
        max_bytes: int = DEFAULT_MAX_BYTES,
        rewind_ns: int = DEFAULT_REWIND_NS,
    ) -> None:
        if slop_ns < 0:
            raise ValueError(f"slop must be >= 0, got {slop_ns} ns")
        if depth_capacity < 1 or pending_capacity < 1 or max_bytes < 1:
            raise ValueError("capacities must be >= 1")
        if rewind_ns <= 0:
            raise ValueError(f"rewind must be > 0, got {rewind_ns} ns")
        self.slop_ns = int(slop_ns)
        self.depth_capacity = depth_capacity
        self.pending_capacity = pending_capacity
        self.max_wait_s = float(max_wait_s)
        self.max_bytes = int(max_bytes)
        self.rewind_ns = int(rewind_ns)
        self._lock = threading.Lock()
        self._stamps: list[int] = []  # sorted
        self._depth: list[tuple[D, bool, int]] = []  # (item, used, nbytes), parallel to _stamps
        self._bytes = 0
        self._pending: list[tuple[int, F, float]] = []  # (stamp, frame, time queued)
        self._stats = MatchStats()
        self._newest_depth: Optional[int] = None
        self._cursor: Optional[int] = None  # stamp of the newest frame (of the current timeline)
        self._depth_lag: deque = deque(maxlen=_OFFSET_SAMPLES)  # depth stamp - arrival (ns)
        self._frame_lag: deque = deque(maxlen=_OFFSET_SAMPLES)  # frame stamp - reception (ns)
        self._evicted: deque = deque(maxlen=_EVICTED_MEMORY)  # stamps dropped by the bound, unused
        self._depth_since_reset = 0
        self._last_arrival = 0

    # --- public --------------------------------------------------------------------------------------
    def push_depth(self, stamp_ns: int, item: D, now: float, nbytes: int = 0) -> list[tuple[F, Optional[D]]]:
        """Buffer a depth image stamped ``stamp_ns`` of ``nbytes`` bytes (its data size, for the byte bound)."""
        with self._lock:
            out: list[tuple[F, Optional[D]]] = []
            self._stats.depth_received += 1
            self._depth_since_reset += 1
            if self._newest_depth is not None and stamp_ns < self._newest_depth - self.rewind_ns:
                self._stats.depth_rewinds += 1
                out += self._rewind(stamp_ns, frames=False)
                self._newest_depth = None
            self._newest_depth = stamp_ns if self._newest_depth is None else max(self._newest_depth, stamp_ns)
            self._depth_lag.append(stamp_ns - int(now * NS))
            self._last_arrival = stamp_ns
            i = bisect.bisect_right(self._stamps, stamp_ns)
            self._stamps.insert(i, stamp_ns)
            self._depth.insert(i, (item, False, max(0, int(nbytes))))
            self._bytes += max(0, int(nbytes))
            self._enforce_bound()
            out += self._resolve_pending(now)
            return out

    def push_frame(
        self, stamp_ns: int, frame: F, now: float, received: Optional[float] = None
    ) -> list[tuple[F, Optional[D]]]:
        """Pair (or queue) a processed frame; ``received`` is the monotonic time its image arrived (for the
        stream offset estimate; None: not known)."""
        with self._lock:
            out = self._resolve_pending(now)
            if self._cursor is not None and stamp_ns < self._cursor - self.rewind_ns:
                self._stats.frame_rewinds += 1
                out += self._rewind(stamp_ns, frames=True)
            if not self._far_ahead(stamp_ns):
                self._cursor = stamp_ns if self._cursor is None else max(self._cursor, stamp_ns)
            if received is not None:
                self._frame_lag.append(stamp_ns - int(received * NS))
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

    def peek(self, stamp_ns: int) -> Optional[D]:
        """The buffered depth item nearest ``stamp_ns`` within slop, or None; takes nothing, counts nothing,
        prunes nothing (the tracker's depth cue reads what is already there, before the frame is pushed)."""
        with self._lock:
            i = bisect.bisect_left(self._stamps, stamp_ns)
            best, best_dt = -1, self.slop_ns + 1
            for j in (i - 1, i):
                if 0 <= j < len(self._stamps) and abs(self._stamps[j] - stamp_ns) < best_dt:
                    best, best_dt = j, abs(self._stamps[j] - stamp_ns)
            return self._depth[best][0] if best >= 0 else None

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
            self._clear()

    def reset(self) -> None:
        """The ROS clock jumped (backwards, or between system and simulated time): forget every stamp.

        Waiting frames are dropped (counted in ``reset_dropped``): their depth belongs to the old timeline.
        """
        with self._lock:
            self._stats.resets += 1
            self._stats.reset_dropped += len(self._pending)
            self._clear()

    def stats(self) -> MatchStats:
        with self._lock:
            st = MatchStats(**vars(self._stats))
            st.buffered, st.buffered_bytes = len(self._stamps), self._bytes
            st.depth_offset_s = self._offset_s()
            return st

    @property
    def buffered(self) -> int:
        with self._lock:
            return len(self._stamps)

    @property
    def buffered_bytes(self) -> int:
        with self._lock:
            return self._bytes

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # --- internals (lock held) -----------------------------------------------------------------------
    def _clear(self) -> None:
        for _, used, _ in self._depth:
            if not used:
                self._stats.depth_unused += 1
        self._stamps, self._depth, self._pending, self._bytes = [], [], [], 0
        self._newest_depth = self._cursor = None
        self._depth_lag.clear()
        self._frame_lag.clear()
        self._evicted.clear()
        self._depth_since_reset = 0

    def _rewind(self, stamp: int, frames: bool) -> list[tuple[F, Optional[D]]]:
        """A stream (``frames``: the colour one) went back to ``stamp``: frames waiting from the old timeline
        are resolved with what it buffered, its depth images are dropped."""
        horizon = stamp + self.rewind_ns
        keep, out = [], []
        for item in self._pending:
            if item[0] > horizon:
                out.append(self._take(item[0], item[1], prune=False))
            else:
                keep.append(item)
        self._pending = keep
        while self._stamps and self._stamps[-1] > horizon:
            self._drop_depth(len(self._stamps) - 1)
        self._evicted.clear()
        self._depth_lag.clear()
        self._frame_lag.clear()
        if frames:
            self._cursor = stamp
        elif self._cursor is not None and self._cursor > horizon:
            self._cursor = None  # frames still in flight are of the old timeline; the next new one sets it
        return out

    def _far_ahead(self, stamp: int) -> bool:
        """A frame stamped beyond every buffered depth image by more than ``rewind``: of another timeline."""
        return bool(self._stamps) and stamp > self._stamps[-1] + self.rewind_ns

    def _enforce_bound(self) -> None:
        while len(self._stamps) > self.depth_capacity or (self._bytes > self.max_bytes and len(self._stamps) > 1):
            # Farthest from where the frames are (before any frame: from the newest arrival, so a few images
            # stamped far ahead go before the stream's own): never the image the next frame needs.
            where = self._cursor if self._cursor is not None else self._last_arrival
            index = 0 if where - self._stamps[0] > self._stamps[-1] - where else -1
            index = index % len(self._stamps)
            if not self._depth[index][1]:
                self._evicted.append(self._stamps[index])
            self._stats.depth_evicted += 1
            self._drop_depth(index)

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

    def _take(self, stamp: int, frame: F, prune: bool = True) -> tuple[F, Optional[D]]:
        """Pair ``frame`` with its nearest depth within slop (or None), then prune depth it has made useless."""
        best, best_dt = -1, self.slop_ns + 1
        nearest_dt: Optional[int] = None
        i = bisect.bisect_left(self._stamps, stamp)
        for j in (i - 1, i):
            if 0 <= j < len(self._stamps):
                dt = abs(self._stamps[j] - stamp)
                nearest_dt = dt if nearest_dt is None else min(nearest_dt, dt)
                if dt < best_dt:
                    best, best_dt = j, dt
        depth: Optional[D] = None
        if best >= 0:
            item, _, nbytes = self._depth[best]
            self._depth[best] = (item, True, nbytes)
            depth = item
            self._stats.matched += 1
        else:
            self._stats.unmatched += 1
            self._stats.last_unmatched_cause = self._cause(stamp, nearest_dt)
        if prune and not self._far_ahead(stamp):
            # Frames come in (nearly) stamp order: depth older than this frame's window serves no later frame.
            cutoff = stamp - self.slop_ns
            while self._stamps and self._stamps[0] < cutoff and not self._older_pending(self._stamps[0]):
                self._drop_depth(0)
        return frame, depth

    def _cause(self, stamp: int, nearest_dt: Optional[int]) -> str:
        slop = f"depth_slop={self.slop_ns / NS:g} s"
        if self._depth_since_reset == 0:
            return "no depth image received" + (" since the last time jump" if self._stats.resets else "")
        offset = self._offset_s()
        if offset is not None and abs(offset) * NS > self.slop_ns:
            side = "ahead of" if offset > 0 else "behind"
            return f"depth stamps run {abs(offset):.2f} s {side} colour ({slop})"
        if any(abs(s - stamp) <= self.slop_ns for s in self._evicted):
            return (f"the depth image for the frame was evicted: depth buffer over its bound "
                    f"({self.depth_capacity} images, {self.max_bytes / 2**20:.0f} MiB)")
        near = f"nearest {nearest_dt / NS:.3f} s away" if nearest_dt is not None else "none buffered"
        return f"no depth image within {slop} ({near})"

    def _offset_s(self) -> Optional[float]:
        if len(self._depth_lag) < 3 or len(self._frame_lag) < 3:
            return None
        return (statistics.median(self._depth_lag) - statistics.median(self._frame_lag)) / NS

    def _older_pending(self, depth_stamp: int) -> bool:
        return any(s - self.slop_ns <= depth_stamp for s, _, _ in self._pending)

    def _drop_depth(self, index: int) -> None:
        _, used, nbytes = self._depth.pop(index)
        self._stamps.pop(index)
        self._bytes -= nbytes
        if not used:
            self._stats.depth_unused += 1
