"""Row runs and the one-pass labelling of all classes (ovseg_ros.core.runs)."""

from __future__ import annotations

import numpy as np

from ovseg_ros.core.runs import row_runs, same_value_components


def test_row_runs_rebuild_the_map_and_break_at_rows() -> None:
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 3, (7, 9)).astype(np.uint8)
    lab[:, :] = np.sort(lab, axis=1)  # long runs, and equal values at row ends/starts
    runs = row_runs(lab)
    assert np.array_equal(np.repeat(runs.value, runs.length).reshape(lab.shape), lab)
    assert np.all(runs.row == (runs.end - 1) // lab.shape[1])  # no run crosses a row boundary


def components(lab: np.ndarray, connectivity: int) -> np.ndarray:
    runs = row_runs(lab)
    members = np.flatnonzero(runs.value > 0)
    comp, key = same_value_components(runs, members, connectivity)
    out = np.full(runs.value.size, -1)
    out[members] = np.argsort(np.argsort(key))[comp]  # number components by key, as OpenCV would
    return np.repeat(out, runs.length).reshape(lab.shape)


def test_diagonal_touch_joins_only_with_8_connectivity_and_classes_never_merge() -> None:
    lab = np.array([[1, 2, 0],
                    [2, 1, 0],
                    [0, 0, 1]], np.uint8)
    eight = components(lab, 8)
    assert eight[0, 0] == eight[1, 1] == eight[2, 2]  # class 1 along the diagonal
    assert eight[0, 1] == eight[1, 0] != eight[0, 0]  # class 2 crosses it, but stays its own component
    four = components(lab, 4)
    assert len({four[0, 0], four[1, 1], four[2, 2], four[0, 1], four[1, 0]}) == 5


def test_components_are_keyed_by_first_block_for_8_and_first_pixel_for_4() -> None:
    # A starts at row 1 col 0, B at row 0 col 4: same 2x2 block row, A's block comes first (8);
    # by first pixel B comes first (4).
    lab = np.zeros((4, 6), np.uint8)
    lab[1, 0] = 1
    lab[0, 4] = 1
    assert components(lab, 8)[1, 0] == 0 and components(lab, 8)[0, 4] == 1
    assert components(lab, 4)[0, 4] == 0 and components(lab, 4)[1, 0] == 1
