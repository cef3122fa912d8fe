"""ovseg_ros: open-vocabulary semantic and panoptic segmentation for ROS 2 with frozen CLIP.

The ROS-free core lives in :mod:`ovseg_ros.core` and never imports rclpy; the ROS layer is
:mod:`ovseg_ros.ros`. When the package is built with colcon, the generated interfaces
(``ovseg_ros.msg``, ``ovseg_ros.srv``) are installed beside these modules.
"""

from pkgutil import extend_path

# Lets the source tree and a colcon install space be combined: with the source first on sys.path,
# ``ovseg_ros.msg``/``ovseg_ros.srv`` still resolve from the install space's generated code.
__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
