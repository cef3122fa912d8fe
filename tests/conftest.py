"""Session-wide test settings, applied before any test imports torch, open_clip or rclpy.

* No model hub: ``HF_HUB_OFFLINE=1`` (no CLIP weights exist on CI machines; tests save random ones).
* DDS stays on 127.0.0.1 (config/fastdds_loopback.xml) on a ROS_DOMAIN_ID unique to this test session, so
  concurrent sessions on one machine do not see each other's nodes. Set ``OVSEG_TEST_DOMAIN_ID`` to pin it.
  These are test settings: the node itself never sets them (a robot needs its real network).
* One intra-op thread by default: CI machines are small and shared.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _session_domain_id() -> int:
    pinned = os.environ.get("OVSEG_TEST_DOMAIN_ID")
    if pinned:
        return int(pinned)
    # 1..100: Fast DDS's port arithmetic is safe up to 101 on Linux; 0 (the default) is avoided.
    return 1 + (os.getpid() * 7919 + int.from_bytes(os.urandom(2), "little")) % 100


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(ROOT / "config" / "fastdds_loopback.xml")
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
os.environ["ROS_DOMAIN_ID"] = str(_session_domain_id())
# The node is configured by its parameters only; the automatic range is irrelevant with the profile above.
os.environ.pop("ROS_LOCALHOST_ONLY", None)


def pytest_report_header(config) -> str:  # noqa: ANN001
    return (
        f"ovseg_ros: ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']} "
        f"FASTDDS_DEFAULT_PROFILES_FILE={os.environ['FASTDDS_DEFAULT_PROFILES_FILE']}"
    )


def pytest_configure(config) -> None:  # noqa: ANN001
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped without one (bash benchmarks/gpu_check.sh)")


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    """Skip tests marked ``cuda`` when no CUDA device is present (they run in benchmarks/gpu_check.sh)."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="no CUDA device (bash benchmarks/gpu_check.sh runs these on a GPU)")
    for item in cuda_items:
        item.add_marker(skip)
