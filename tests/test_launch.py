"""launch_testing test of launch/segment.launch.py: the node started by the real launch file segments a
synthetic stream and exits cleanly. Skips where launch_testing is not installed (it is not on PyPI; a ROS
install has it). The launch file's arguments are also checked without launch in tests/ros/test_launch_file.py.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import unittest
from pathlib import Path

import pytest

launch_testing = pytest.importorskip(
    "launch_testing", reason="launch_testing is not installed (not on PyPI; install ros-<distro>-launch-testing)"
)
pytest.importorskip("launch_ros", reason="launch_ros is not installed (not on PyPI)")

import launch  # noqa: E402
import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "ros"))  # ros_harness
NAMESPACE = f"/ovseg_launch_test_{os.getpid()}"
LAUNCH_FILE = Path(__file__).resolve().parents[1] / "launch" / "segment.launch.py"


@pytest.mark.launch_test
def generate_test_description() -> launch.LaunchDescription:
    from ovseg_ros.core.models import save_random_checkpoint

    ckpt = save_random_checkpoint("ovseg-tiny-vit", Path(tempfile.mkdtemp()) / "tiny.pt")
    include = launch.actions.IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(LAUNCH_FILE)),
        launch_arguments={
            "namespace": NAMESPACE,
            "image": f"{NAMESPACE}/camera/image",
            "segmenter": "dense_clip",
            "model": "ovseg-tiny-vit",
            "checkpoint": str(ckpt),
            "device": "cpu",
            "vocabulary": "indoor_robot",
            "log_level": "info",
        }.items(),
    )
    return launch.LaunchDescription([include, launch_testing.actions.ReadyToTest()])


class TestSegmentLaunch(unittest.TestCase):
    def test_labels_come_out(self, proc_output) -> None:  # noqa: ANN001
        import rclpy
        from sensor_msgs.msg import Image
        from ros_harness import RosClient, make_image, publish_until, same_header

        rclpy.init()
        client = RosClient("ovseg_launch_test_client")
        try:
            labels = client.subscribe(f"{NAMESPACE}/segment_node/semantic/labels", Image)
            pub = client.publisher(f"{NAMESPACE}/camera/image", Image)
            deadline = time.monotonic() + 120
            hit = None
            while hit is None and time.monotonic() < deadline:
                hit, _ = publish_until(pub, lambda i: make_image(), labels,
                                       lambda m, sent: any(same_header(m.header, s.header) for s in sent), 10)
            self.assertIsNotNone(hit, "no labels from the launched node")
            self.assertEqual(hit.encoding, "mono8")
        finally:
            client.close()
            rclpy.try_shutdown()


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_exit_codes(self, proc_info) -> None:  # noqa: ANN001
        launch_testing.asserts.assertExitCodes(proc_info)
