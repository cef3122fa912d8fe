"""A peer on the ROS graph in its own process (what `ros2 param set` and `ros2 topic pub` would do), used by
the fault-injection suite: ``python fault_attacker.py NODE_FQN NAMESPACE``.

It sets ``segmenter_options`` to a YAML date (``2001-12-14``, not JSON-serialisable) and publishes
CompressedImages whose PNG header claims 50000x50000 pixels, then prints one JSON line with the parameter
service's answer. Exit 0 when the node answered, 3 when it did not.
"""

from __future__ import annotations

import array
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(fqn: str, namespace: str) -> int:
    import rclpy
    from rcl_interfaces.srv import SetParameters
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage

    from fault_harness import png_bytes, to_parameter_msg

    rclpy.init()
    node = rclpy.create_node("ovseg_fault_attacker")
    try:
        pub = node.create_publisher(CompressedImage, f"{namespace}/image/compressed",
                                    QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        cli = node.create_client(SetParameters, f"{fqn}/set_parameters")
        if not cli.wait_for_service(timeout_sec=20.0):
            print(json.dumps({"answered": False, "why": "set_parameters not available"}))
            return 3
        future = cli.call_async(SetParameters.Request(parameters=[to_parameter_msg("segmenter_options", "2001-12-14")]))
        rclpy.spin_until_future_complete(node, future, timeout_sec=20.0)
        answer = None
        if future.done() and future.result() is not None:
            r = future.result().results[0]
            answer = {"successful": bool(r.successful), "reason": r.reason}
        lie = png_bytes(50000, 50000, b"\x78\x9c" + bytes(64))
        for _ in range(20):  # best-effort input: repeat, and give discovery time
            msg = CompressedImage(format="png", data=array.array("B", lie))
            msg.header.frame_id = "attacker"
            pub.publish(msg)
            rclpy.spin_once(node, timeout_sec=0.0)
            time.sleep(0.1)
        print(json.dumps({"answered": answer is not None, "result": answer}))
        return 0 if answer is not None else 3
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
