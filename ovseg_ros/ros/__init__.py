"""The ROS 2 layer of ovseg_ros: the lifecycle ``segment_node`` and its helpers.

* :mod:`.conversions` - sensor_msgs images <-> numpy (our own converter; ROS cv_bridge when importable).
* :mod:`.qos` - the QoS profiles of inputs, outputs and latched topics.
* :mod:`.params` - parameter declarations, descriptors and validation.
* :mod:`.mailbox` - the one-slot latest-frame mailbox between the subscription and the worker.
* :mod:`.messages` - core results -> ovseg_ros / vision_msgs / diagnostic messages.
* :mod:`.gate` - the output gate every output passes (publish lock, active flag, current binding).
* :mod:`.segment_node` - the node and ``main()``.

The demo and benchmark clients (synthetic camera, node subprocess) are not part of the package:
``scripts/stream_client.py``.
"""
