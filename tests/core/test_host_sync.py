"""No host synchronisation per frame in the realtime paths of dense_clip and ITACLIP, apart from the one
copy of the label and confidence planes (``to_host``), checked on the CPU with :mod:`host_sync`.

``models.SYNC_FREE_DEVICE_TYPES`` gets ``cpu`` so the CPU runs the formulation a GPU runs; the test also
checks that it gives the CPU path's labels. The counter itself is checked to see the usual culprits.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from host_sync import count_host_syncs
from ovseg_ros.core import models
from ovseg_ros.core.segmenter import build_segmenter
from ovseg_ros.core.vocabulary import Vocabulary

#: The one allowed copy: labels and confidence to numpy.
ALLOWED = {"Tensor.numpy": 2}


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.zeros((60, 80, 3), dtype=np.uint8)
    img[:, :40], img[:, 40:], img[20:40, 30:50] = (200, 30, 30), (30, 30, 200), (30, 200, 30)
    return (img * 0.7 + rng.integers(0, 70, img.shape)).astype(np.uint8)


def test_the_counter_sees_the_usual_syncs() -> None:
    x = torch.arange(10.0)
    with count_host_syncs() as c:
        int(x.sum()), x.tolist(), (x > 3).nonzero(), x[x > 3], float(x.max())  # noqa: B018
        x.repeat_interleave(torch.full((10,), 2)), torch.bincount(x.long())
        if x.any():
            pass
    assert c["Tensor.__int__"] == 1 and c["Tensor.tolist"] == 1 and c["aten.nonzero"] == 1
    assert c["aten.index (boolean mask)"] == 1 and c["Tensor.__float__"] == 1 and c["Tensor.__bool__"] == 1
    assert c["aten.repeat_interleave (no output_size)"] == 1 and c["aten.bincount"] == 1


@pytest.mark.parametrize("classes", [6, 20])  # 20: above ITACLIP's FAST_MIN_CLASSES (the ranking path)
@pytest.mark.parametrize("name", ["dense_clip", "itaclip"])
def test_realtime_segment_has_no_host_sync(
    name: str, classes: int, tiny_model_overrides: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = {"templates": "photo"} if name == "itaclip" else {}
    seg = build_segmenter(name, "realtime", {**tiny_model_overrides, "short_side": 64, **extra})
    names = ["floor", "wall", "chair", "table", "person", "door"] + [f"thing {i}" for i in range(classes - 6)]
    state = seg.encode_vocabulary(Vocabulary.from_request(names))
    img = _image()
    if name == "itaclip":  # the CPU reference without pruning (a GPU refines every row: exact, not pruned)
        seg.config = dataclasses.replace(seg.config, prune_names=0)
    ref = seg.segment(img, state)
    monkeypatch.setattr(models, "SYNC_FREE_DEVICE_TYPES", {"cuda", "cpu"})
    seg.segment(img, state)  # warm (first-frame caches)
    with count_host_syncs() as counts:
        out = seg.segment(img, state)
    assert dict(counts) == ALLOWED, f"{name}: host syncs in one frame: {dict(counts)}"
    assert float((out.labels == ref.labels).mean()) >= 0.999
    np.testing.assert_allclose(out.confidence, ref.confidence, atol=1e-5)


def test_itaclip_cpu_path_still_prunes(tiny_model_overrides: dict) -> None:
    """Outside the sync-free mode the CPU keeps its sparse shortcuts (they are what keeps it flat in K)."""
    seg = build_segmenter("itaclip", "realtime", {**tiny_model_overrides, "short_side": 64, "templates": "photo"})
    state = seg.encode_vocabulary(Vocabulary.from_request([f"thing {i}" for i in range(20)]))
    with count_host_syncs() as counts:
        seg.segment(_image(), state)
    assert counts["aten.index (boolean mask)"] >= 1
