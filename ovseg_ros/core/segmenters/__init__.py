"""The segmentation methods. Importing this package registers each one by name.

One module per method, each registering itself with :func:`ovseg_ros.core.segmenter.register_segmenter`:
``dense_clip`` (MaskCLIP-style dense CLIP, the speed floor), ``itaclip``, ``clip_es``, ``car``, ``fcclip``;
``color_key`` is model-free (a known output for testing and benchmarking the ROS layer).

Every public module of this package is imported (found with :mod:`pkgutil`, no list to keep in step): adding
a method is adding its module. The launch file's ``segmenter`` choices are pinned to the registry by a test.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
