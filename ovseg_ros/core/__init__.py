"""ROS-free core: models, text and vocabulary, segmenters and post-processing.

Nothing under this package may import rclpy or any ROS message package (a test enforces it),
so the segmenters can be used from scripts, notebooks and the offline tool.
"""
