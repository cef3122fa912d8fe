"""SemanticPointsOutput under clocks that disagree (issue 17 defect 3): /diagnostics and the health message
name the real cause - depth stamps running ahead of colour - and a reset (a ROS clock jump) empties the
matcher. In-process, callbacks called directly (helpers of test_points)."""

from __future__ import annotations

import time

import numpy as np
from ros_harness import require_ros_or_skip

require_ros_or_skip()

from test_points import Capture, camera_info, depth_image, frame_arrays, header, out  # noqa: E402,F401

from ovseg_ros.ros.points import SemanticPointsOutput  # noqa: E402


def test_depth_ahead_of_colour_is_named(out: tuple[SemanticPointsOutput, Capture]) -> None:  # noqa: F811
    o, cap = out
    o._on_camera_info(camera_info())
    labels, conf, rgb = frame_arrays()
    mm = np.full((12, 16), 2000, np.uint16)
    o.health()
    for i in range(20):  # depth stamped 0.825 s ahead of the colour frame taken at the same moment
        sec, nsec = divmod(1_000_000_000_000 + i * 50_000_000 + 825_000_000, 1_000_000_000)
        o._on_depth(depth_image(mm, "16UC1", sec, nsec))
        csec, cnsec = divmod(1_000_000_000_000 + i * 50_000_000, 1_000_000_000)
        o.publish(header(csec, cnsec), labels, conf, rgb, received=time.monotonic())
    problem = o.health()
    assert problem is not None and "depth stamps run 0.8" in problem and "ahead of colour" in problem, problem
    diag = o.diagnostics()
    assert abs(float(diag["depth_stamp_offset_s"]) - 0.825) < 0.05
    assert "ahead of colour" in diag["points_last_unmatched_cause"]
    assert int(diag["depth_buffered"]) > 0 and float(diag["depth_buffered_mb"]) >= 0.0


def test_reset_empties_the_matcher(out: tuple[SemanticPointsOutput, Capture]) -> None:  # noqa: F811
    o, cap = out
    o._on_camera_info(camera_info())
    mm = np.full((12, 16), 2000, np.uint16)
    for sec in range(50, 55):
        o._on_depth(depth_image(mm, "16UC1", sec))
    assert o.diagnostics()["depth_buffered"] == "5"
    o.reset()
    assert o.diagnostics()["depth_buffered"] == "0"
    labels, conf, rgb = frame_arrays()
    o._on_depth(depth_image(mm, "16UC1", 3))  # the new timeline pairs at once
    assert o.publish(header(3), labels, conf, rgb, unlabeled_id=255) is True and len(cap.msgs) == 1
