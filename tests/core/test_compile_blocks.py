"""``compile_blocks`` (torch.compile of the ViT's unmodified blocks) changes speed, never results."""

from __future__ import annotations

import numpy as np
import pytest

from ovseg_ros.core import clip_vit
from ovseg_ros.core.models import load_clip
from ovseg_ros.core.segmenter import build_segmenter
from ovseg_ros.core.vocabulary import Vocabulary

CASES = {
    "dense_clip": {"short_side": 64},
    "itaclip": {"short_side": 64, "slide_crop": 0, "pamr_steps": 2},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_blocks_give_the_same_result(name: str, tiny_model_overrides: dict, rgb_image: np.ndarray) -> None:
    vocab = Vocabulary.from_request(["floor", "chair", "person, people", "door"])
    results = []
    for compiled in (False, True):
        seg = build_segmenter(name, "realtime", {**tiny_model_overrides, **CASES[name], "compile_blocks": compiled})
        seg.set_vocabulary(vocab)
        results.append(seg.segment(rgb_image))
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in clip_vit.blocks(seg.clip.visual))
    assert (results[0].labels == results[1].labels).mean() >= 0.999
    np.testing.assert_allclose(results[0].confidence, results[1].confidence, atol=1e-4)
    # Compiled in place: the weights keep their names (checkpoints and hashes are unaffected).
    assert list(seg.clip.model.state_dict()) == list(load_clip(seg.config.model).model.state_dict())
