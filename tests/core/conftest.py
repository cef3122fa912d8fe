"""Fixtures of the core tests: tiny random-weight CLIP models saved to disk and loaded back.

No pretrained CLIP exists on CI machines, so every model here is random; the tests check mathematics,
shapes and plumbing, never recognition quality.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_vit_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random ``ovseg-tiny-vit`` weights (12 blocks, width 32, patch 16) saved as a state_dict file."""
    from ovseg_ros.core.models import save_random_checkpoint

    return save_random_checkpoint("ovseg-tiny-vit", tmp_path_factory.mktemp("weights") / "tiny_vit.pt", seed=0)


@pytest.fixture(scope="session")
def tiny_model_overrides(tiny_vit_checkpoint: Path) -> dict:
    """``overrides`` for build_segmenter that select the tiny model through the checkpoint path."""
    return {"model": {"name": "ovseg-tiny-vit", "pretrained": "", "checkpoint": str(tiny_vit_checkpoint),
                      "precision": "fp32"}}


@pytest.fixture()
def rgb_image() -> np.ndarray:
    """A 60x80 RGB test image with structure (two halves, a square)."""
    img = np.zeros((60, 80, 3), dtype=np.uint8)
    img[:, :40] = (200, 30, 30)
    img[:, 40:] = (30, 30, 200)
    img[20:40, 30:50] = (30, 200, 30)
    return img
