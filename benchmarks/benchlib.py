"""Shared helpers of the benchmark scripts (run them as scripts: ``python benchmarks/bench_X.py``)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

# Run from a source checkout without installing: the repository root holds the package.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))


def timed(
    fn: Callable[[], Any],
    repeats: int,
    device: torch.device,
    warmup: int = 1,
    reduce: Callable[[list[float]], float] = statistics.median,
) -> float:
    """Wall time of ``fn`` (``reduce`` over ``repeats`` runs, after ``warmup`` untimed runs).

    CUDA is synchronised around each run so GPU work is measured, not just queued. The median is the default;
    the minimum is the figure least disturbed by other processes on a shared machine.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return reduce(times)
