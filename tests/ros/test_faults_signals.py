"""Signals and the shutdown transition (issue 9, items 3 and 10): a node streaming at 30 Hz must stop cleanly.

One SIGINT (Ctrl-C), two SIGINTs 50 ms apart (Ctrl-C in a terminal under `ros2 launch`: the terminal and
launch both deliver it) and SIGTERM (launch's escalation, systemd, docker stop): exit code 0 within
EXIT_BOUND_S (the node's 2 s plus scheduling margin), also with a slow inference (6 s per frame) in flight, and nothing in the output that says otherwise (traceback, "terminate called", publishing on a dead
context). A lifecycle shutdown while a vocabulary change encodes leaves a live, finalized node that still
answers get_state and then stops cleanly too.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import time
from typing import Any, Iterator

import pytest
from fault_harness import Target, color_key_params
from ros_harness import RosClient, require_ros_or_skip

require_ros_or_skip()

#: Signal to exit, measured from outside: the node's own bound (process.SHUTDOWN_BOUND_S, 2 s) plus 1.5 s for a
#: loaded machine to schedule the dying process (a CI-like load of 10 took 2.01 and 2.66 s), still below what
#: matters to a user: launch's SIGINT -> SIGTERM escalation after 5 s.
EXIT_BOUND_S = 3.5
_runs = itertools.count(1)
BAD_OUTPUT = ("Traceback", "terminate called", "context is invalid", "Segmentation fault", "InvalidHandle")


@pytest.fixture
def streaming(client: RosClient, namespace: str, tmp_path: Any) -> Iterator[Target]:
    """A fresh color_key node under a 30 Hz camera, frames flowing."""
    ns = f"{namespace}_sig{next(_runs)}"
    t = Target(client, ns, color_key_params(), tmp_path)
    try:
        t.wait_active()
        assert t.labels.wait_for(timeout=20.0) is not None, f"no frames before the signal\n{t.tail()}"
        yield t
    finally:
        t.close()


def _stop_with(t: Target, signals: list[signal.Signals], gap_s: float = 0.05) -> None:
    t0 = time.monotonic()
    for i, sig in enumerate(signals):
        if i:
            time.sleep(gap_s)
        t.proc.proc.send_signal(sig)
    try:
        code = t.proc.proc.wait(timeout=EXIT_BOUND_S + 8.0)  # measured below; the margin only avoids a hang
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {EXIT_BOUND_S + 8.0} s after {[s.name for s in signals]}\n{t.tail()}")
    took = time.monotonic() - t0
    out = t.proc.output()
    assert code == 0, f"exit code {code} after {[s.name for s in signals]}\n{out[-4000:]}"
    for bad in BAD_OUTPUT:
        assert bad not in out, f"{bad!r} in the output after {[s.name for s in signals]}\n{out[-4000:]}"
    assert took <= EXIT_BOUND_S, f"took {took:.2f} s to exit after {[s.name for s in signals]}"


def test_one_sigint_under_load_exits_cleanly(streaming: Target) -> None:
    _stop_with(streaming, [signal.SIGINT])


@pytest.mark.parametrize("run", range(3))  # the crash was intermittent (8 of 11 runs)
def test_two_sigints_50ms_apart_under_load_exit_cleanly(streaming: Target, run: int) -> None:
    _stop_with(streaming, [signal.SIGINT, signal.SIGINT])


def test_sigterm_under_load_exits_cleanly(streaming: Target) -> None:
    _stop_with(streaming, [signal.SIGTERM])


SLOW_INFERENCE_MS = 6000.0  # longer than EXIT_BOUND_S: a shutdown that waits for the inference cannot pass


@pytest.fixture
def slow_streaming(client: RosClient, namespace: str, tmp_path: Any) -> Iterator[Target]:
    """A node whose segmenter takes 6 s per frame (color_key's simulated model time), an inference in flight."""
    ns = f"{namespace}_slow{next(_runs)}"
    t = Target(client, ns, color_key_params(segmenter_options=f"{{cost_ms: {SLOW_INFERENCE_MS}}}"), tmp_path)
    try:
        t.wait_active()
        assert t.labels.wait_for(timeout=30.0) is not None, f"no frames before the signal\n{t.tail()}"
        time.sleep(0.3)  # the next frame's inference has started (the camera streams at 30 Hz)
        yield t
    finally:
        t.close()


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGTERM], [signal.SIGINT, signal.SIGINT]],
                         ids=["sigint", "sigterm", "two_sigints"])
def test_signals_with_a_slow_inference_in_flight_exit_within_the_bound(slow_streaming: Target,
                                                                       signals: list[signal.Signals]) -> None:
    """The stated bound (process.SHUTDOWN_BOUND_S) holds whatever the model's speed, below launch's 5 s
    SIGINT -> SIGTERM escalation."""
    from ovseg_ros.ros.process import SHUTDOWN_BOUND_S

    assert SHUTDOWN_BOUND_S <= EXIT_BOUND_S < 5.0 and SLOW_INFERENCE_MS / 1e3 > EXIT_BOUND_S + 1.0
    _stop_with(slow_streaming, signals)


def test_shutdown_transition_while_set_vocabulary_runs(streaming: Target) -> None:
    t = streaming
    fut, done = t.set_vocabulary_async([f"object {i}" for i in range(2000)])
    time.sleep(0.3)
    t.transition("shutdown", timeout=30.0)
    assert t.proc.alive(), f"the node died on shutdown with a call in flight\n{t.tail()}"
    assert t.assert_state_answers() == "finalized"
    if done.wait(15.0):
        r = fut.result()
        assert r.success or r.message.strip(), "the interrupted change was answered without a reason"
    time.sleep(0.5)
    assert t.proc.alive(), f"the node died after a shutdown with a call in flight\n{t.tail()}"
    assert t.assert_state_answers() == "finalized"
    _stop_with(t, [signal.SIGINT])
