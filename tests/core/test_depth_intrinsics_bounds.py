"""camera_info values that are finite but absurd (issue 17 defect 7): ``fx=1e-300`` or ``cx=1e30`` were
accepted and gave infinite points; they are refused with a reason, and whatever passes projects to finite
points."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ovseg_ros.core import depth as dp

W, H = 640, 480


def k(fx: float = 500.0, fy: float = 500.0, cx: float = 320.0, cy: float = 240.0) -> list[float]:
    return [fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("values,fragment", [
    (dict(fx=1e-300), "fx=1e-300"),
    (dict(fy=1e-300), "fy=1e-300"),
    (dict(fx=1e300), "fx=1e+300"),
    (dict(fx=1.0), "focal lengths must be within"),
    (dict(cx=1e30), "cx=1e+30"),
    (dict(cy=-1e30), "cy=-1e+30"),
    (dict(cx=math.nan), "invalid"),
    (dict(fx=math.inf), "invalid"),
    (dict(fx=-500.0), "invalid"),
])
def test_absurd_intrinsics_are_refused_with_the_reason(values: dict, fragment: str) -> None:
    with pytest.raises(dp.DepthError, match=fragment.replace("+", r"\+")):
        dp.intrinsics_from_camera_info(k(**values), [0.0] * 12, W, H)


def test_absurd_p_is_refused_too() -> None:
    p = [1e-300, 0, 320.0, 0, 0, 500.0, 240.0, 0, 0, 0, 1, 0]
    with pytest.raises(dp.DepthError, match="camera_info P has fx"):
        dp.intrinsics_from_camera_info(k(), p, W, H)


@pytest.mark.parametrize("values", [dict(fx=6.4, fy=4.8), dict(fx=640_000.0, fy=480_000.0),
                                    dict(cx=-6000.0, cy=5000.0), dict()])
def test_extreme_but_accepted_intrinsics_give_finite_points(values: dict) -> None:
    intr = dp.intrinsics_from_camera_info(k(**values), [0.0] * 12, W, H)
    depth = np.full((H, W), 1000.0, np.float32)  # the farthest max_depth the node allows
    pts = dp.project(depth, intr, 0.0, 1000.0)
    assert np.isfinite(pts).all()
