"""Fixtures of the ROS-layer tests (session-wide DDS settings are in tests/conftest.py).

The node tests need the built package (``bash scripts/test.sh`` builds it and sources scripts/env.sh);
without it their modules skip with the reason (see ros_harness.ros_unavailable_reason). The conversion
tests run either way.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterator

import pytest
from ros_harness import RosClient

_ns_counter = itertools.count(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random ``ovseg-tiny-vit`` weights saved to disk: the node loads them through its checkpoint path."""
    from ovseg_ros.core.models import save_random_checkpoint

    return save_random_checkpoint("ovseg-tiny-vit", tmp_path_factory.mktemp("weights") / "tiny.pt", seed=0)


@pytest.fixture(scope="session")
def fast_params(tiny_checkpoint: Path) -> dict:
    """segment_node parameters for a fast CPU run with the tiny random model."""
    return {
        "segmenter": "dense_clip",
        "model": "ovseg-tiny-vit",
        "checkpoint": str(tiny_checkpoint),
        "device": "cpu",
        "cache_dir": "",
        "vocabulary": ["floor", "chair", "person, people", "door"],
        "segmenter_options": "{short_side: 96, templates: photo}",
        "diagnostics_period": 0.5,
        "max_image_pixels": 100_000,
    }


@pytest.fixture(scope="session")
def ros_session() -> Iterator[None]:
    """rclpy initialised once for the test process."""
    import rclpy

    rclpy.init()
    yield
    rclpy.try_shutdown()


@pytest.fixture(scope="module")
def client(ros_session: None, request: pytest.FixtureRequest) -> Iterator[RosClient]:
    c = RosClient(f"ovseg_test_client_{os.getpid()}_{next(_ns_counter)}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def namespace() -> str:
    """A namespace unique to the module (tests of one session share a DDS domain)."""
    return f"/ovseg_test_{os.getpid()}_{next(_ns_counter)}"
