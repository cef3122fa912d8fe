"""segment_node's interpreter tuning: the GIL switch interval and its environment override."""

from __future__ import annotations

import pytest

pytest.importorskip("rclpy", reason="rclpy not importable")

from ovseg_ros.ros.process import GIL_SWITCH_INTERVAL_MS, switch_interval_s  # noqa: E402


def test_default_is_below_pythons_five_ms() -> None:
    assert switch_interval_s(None) == switch_interval_s("") == GIL_SWITCH_INTERVAL_MS / 1e3
    assert switch_interval_s(None) < 0.005


@pytest.mark.parametrize("text, seconds", [("5", 0.005), ("0.25", 0.00025), ("1000", 1.0)])
def test_override_in_milliseconds(text: str, seconds: float) -> None:
    assert switch_interval_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["0", "-1", "abc", "1e9", "nan"])
def test_bad_override_is_ignored_with_a_message(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert switch_interval_s(text) == GIL_SWITCH_INTERVAL_MS / 1e3
    assert "ignoring OVSEG_GIL_SWITCH_INTERVAL_MS" in capsys.readouterr().err
