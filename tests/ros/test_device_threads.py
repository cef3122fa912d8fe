"""Every worker thread selects the node's CUDA device before its first CUDA call (no GPU needed).

CUDA's current device is per thread and starts at 0, so with ``device:=cuda:1`` a thread that never calls
``torch.cuda.set_device`` would allocate on GPU 0. ``torch.cuda.set_device`` is replaced by a recorder here.
"""

from __future__ import annotations

import threading
import types

import pytest
import torch

from ovseg_ros.core import models


@pytest.fixture()
def set_device_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    calls: list[tuple[str, int]] = []
    lock = threading.Lock()

    def record(index: int) -> None:
        with lock:
            calls.append((threading.current_thread().name, int(index)))

    monkeypatch.setattr(torch.cuda, "set_device", record)
    return calls


def _in_thread(fn, name: str = "worker") -> None:
    t = threading.Thread(target=fn, name=name)
    t.start()
    t.join(10)


def test_select_device_is_a_no_op_on_the_cpu(set_device_calls: list) -> None:
    _in_thread(lambda: (models.select_device("cpu"), models.select_device(None),
                        models.select_device(torch.device("cpu"))))
    assert set_device_calls == []


def test_select_device_sets_once_per_thread_and_device(set_device_calls: list) -> None:
    def work() -> None:
        for _ in range(3):
            models.select_device("cuda:1")  # per frame: free after the first
        models.select_device(torch.device("cuda", 0))
        models.select_device("cuda")  # index 0 again: nothing to do

    _in_thread(work, "a")
    _in_thread(lambda: models.select_device("cuda:1"), "b")  # a new thread starts at device 0: set again
    assert set_device_calls == [("a", 1), ("a", 0), ("b", 1)]


class _Logger:
    def error(self, *args, **kwargs) -> None:
        pass


def test_pipeline_threads_select_the_model_device(set_device_calls: list) -> None:
    from ovseg_ros.ros.guard import ErrorLog
    from ovseg_ros.ros.pipeline import Pipeline

    binding = types.SimpleNamespace(segmenter=types.SimpleNamespace(device=torch.device("cuda:1")))
    node = types.SimpleNamespace(get_logger=lambda: _Logger())
    errors = ErrorLog()
    pipe = Pipeline(node, [], threading.Event(), lambda: binding, errors)
    pipe.start()
    try:
        deadline = threading.Event()
        for _ in range(100):
            if len(set_device_calls) >= 2:
                break
            deadline.wait(0.05)
    finally:
        assert pipe.stop(5.0)
    assert sorted(set_device_calls) == [("ovseg_infer", 1), ("ovseg_publish", 1)]
    assert not errors.counts


def test_vocabulary_jobs_select_the_model_device(set_device_calls: list) -> None:
    from ovseg_ros.ros.vocabulary_service import JobRunner

    runner = JobRunner()
    seen: list[str] = []
    job, busy = runner.start("vocabulary", "test", lambda: seen.append(threading.current_thread().name),
                             torch.device("cuda:2"))
    assert job is not None and not busy
    assert runner.wait(job, 10.0) == "" and job.error is None
    assert set_device_calls == [("ovseg_vocabulary", 2)] and seen == ["ovseg_vocabulary"]
    job, _ = runner.start("query", "cpu model", lambda: None, torch.device("cpu"))
    assert job is not None and runner.wait(job, 10.0) == ""
    assert len(set_device_calls) == 1  # a CPU model: nothing selected
