"""ITACLIP's ``prune_rows``: at most that many text rows are refined (PAMR) whatever the vocabulary size, and the
class maps after it exist only for classes that kept a row; labels still agree with the uncapped path."""

from __future__ import annotations

import numpy as np
import pytest

from ovseg_ros.core.segmenter import build_segmenter
from ovseg_ros.core.vocabulary import Vocabulary


def _image() -> np.ndarray:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    image[20:70, 30:100] //= 3
    return image


@pytest.mark.parametrize("classes", [8, 150])
def test_refined_rows_are_capped(tiny_model_overrides: dict, classes: int) -> None:
    opts = {**tiny_model_overrides, "short_side": 96, "templates": "photo", "pamr_steps": 2}
    seg = build_segmenter("itaclip", "realtime", {**opts, "prune_rows": 12})
    st = seg.encode_vocabulary(Vocabulary.from_request([f"thing {i}" for i in range(classes)]))
    x = seg._prepare(_image())
    rows, owners = seg._pruned_logits(x, st.text, st, upsample=False)
    assert rows.shape[1] == len(owners) <= 12 + 1  # the kept rows and the folded one
    red = seg._reduce_rows(x, rows, owners, st)
    kept_classes = {int(o) for o in owners if int(o) < classes}
    assert kept_classes  # class rows that win patches are not crowded out by background words
    assert red.cls.shape[0] == max(1, len(kept_classes))
    if red.classes is not None:
        assert set(red.classes.tolist()) == kept_classes

    capped = seg.segment(_image(), st)
    uncapped = build_segmenter("itaclip", "realtime", {**opts, "prune_rows": 0})
    ref = uncapped.segment(_image(), uncapped.encode_vocabulary(st.vocabulary))
    assert set(np.unique(capped.labels)) <= kept_classes | {-1}
    assert float((capped.labels == ref.labels).mean()) >= 0.98
