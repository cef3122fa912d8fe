"""The segmentation methods. Importing this package registers each one by name.

One module per method, each registering itself with :func:`ovseg_ros.core.segmenter.register_segmenter`:
``dense_clip`` (MaskCLIP-style dense CLIP, the speed floor), ``itaclip``, ``clip_es``, ``car``, ``fcclip``;
``color_key`` is model-free (a known output for testing and benchmarking the ROS layer).
"""

import importlib
import logging

_log = logging.getLogger(__name__)

for _name in ("dense_clip", "itaclip", "clip_es", "car", "fcclip", "color_key"):
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as exc:  # a method still being added must not break the others
        if exc.name != f"{__name__}.{_name}":
            raise
        _log.debug("segmenter module %s not present", _name)
