"""Golden-number parity of every paper preset (see ``harness.py``): fails when any stage drifts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory):
    return harness.make_weights(tmp_path_factory.mktemp("parity"))


def test_every_paper_preset_has_a_golden() -> None:
    from ovseg_ros.core.segmenter import list_presets

    for segmenter, preset in harness.CASES:
        assert preset in list_presets(segmenter)
        assert harness.golden_path(segmenter, preset).stat().st_size < 8192  # a few KB each


@pytest.mark.parametrize("segmenter, preset", harness.CASES, ids=[f"{s}-{p}" for s, p in harness.CASES])
def test_stages_match_goldens(segmenter: str, preset: str, weights) -> None:
    ref = json.loads(harness.golden_path(segmenter, preset).read_text())
    got = harness.run_case(segmenter, preset, weights)
    errors = harness.compare(got, ref)
    assert not errors, f"{segmenter}/{preset} drifted from its golden (tests/parity/regen.py):\n" + "\n".join(errors)


def test_compare_flags_a_drift() -> None:
    rec = {"x": harness.fingerprint([1.0, 2.0, 3.0]), "labels": harness.label_print([[0, 1], [1, 1]])}
    assert harness.compare(rec, rec) == []
    moved = {"x": harness.fingerprint([1.0, 2.0, 3.01]), "labels": harness.label_print([[0, 0], [0, 1]])}
    errors = harness.compare(moved, rec)
    assert any(e.startswith("x:") for e in errors) and any(e.startswith("labels:") for e in errors)
