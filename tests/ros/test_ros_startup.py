"""Startup failures of the real segment_node: a missing checkpoint and invalid parameter values make
configure fail with a clear message; the process neither crashes nor prints a traceback, stays
unconfigured (so a lifecycle manager or a user can fix and retry) and reports the reason on /diagnostics."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from ros_harness import NodeProcess, RosClient, require_ros_or_skip

require_ros_or_skip()

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402

MISSING = "/nonexistent/ovseg/tiny.pt"


@pytest.fixture(scope="module")
def procs(namespace: str, fast_params: dict, tmp_path_factory: Any) -> Iterator[dict[str, NodeProcess]]:
    """Both failing nodes start together (startup is the slow part)."""
    work = tmp_path_factory.mktemp("startup")
    started = {
        "missing": NodeProcess(f"{namespace}_missing", {**fast_params, "checkpoint": MISSING}, work / "missing"),
        "invalid": NodeProcess(
            f"{namespace}_invalid",
            {**fast_params, "precision": "fp64", "max_image_pixels": 0, "device": "gpu", "segmenter": "nope"},
            work / "invalid",
        ),
    }
    try:
        yield started
    finally:
        for p in started.values():
            code = p.stop()
            assert code == 0, p.output()


def _check(proc: NodeProcess, client: RosClient, diag: Any, expected: list[str]) -> None:
    assert proc.wait_for_log("configure failed", timeout=120), proc.output()
    out = proc.output()
    for text in expected:
        assert text in out, out
    assert "Traceback" not in out, out
    assert proc.alive(), "the node must stay up, unconfigured"
    assert client.lifecycle_state(proc.fqn) == "unconfigured"

    def failing(msg: DiagnosticArray) -> bool:
        return any(proc.fqn in s.name and s.level == DiagnosticStatus.ERROR and expected[0] in s.message
                   for s in msg.status)

    assert diag.wait_for(failing, timeout=15) is not None, "the failure is not on /diagnostics"


def test_missing_checkpoint_fails_configure_with_the_model_error(procs: dict, client: RosClient) -> None:
    diag = client.subscribe("/diagnostics", DiagnosticArray)
    _check(procs["missing"], client, diag, [f"checkpoint '{MISSING}' does not exist"])


def test_invalid_parameters_fail_configure_with_every_reason(procs: dict, client: RosClient) -> None:
    diag = client.subscribe("/diagnostics", DiagnosticArray)
    _check(procs["invalid"], client, diag, [
        "invalid parameters",
        "max_image_pixels",  # out of the descriptor's range: refused at declaration
        "precision must be one of auto, fp32, fp16, bf16",
        "device must be auto, cpu, cuda or cuda:N",
        "unknown segmenter 'nope'",
    ])
