"""Connected components of every class of a label map at once, on row runs instead of pixels.

A segmenter's label map is piecewise constant: a 640x480 frame with tens of segments has a few thousand
maximal horizontal runs of one value, against 307,200 pixels. Working on runs lets one pass find the
components of all classes together (a binary labeller such as OpenCV's would need one pass per class, since
touching regions of two classes must stay apart) and gives areas, boxes and confidence sums from a few
reductions over the runs. The only per-pixel passes are finding the runs, summing the confidence per run and
painting the ids back.

Component order matches OpenCV's sequential labelling of each class's binary mask: by the first 2x2 block in
raster order for 8-connectivity (its block-based algorithms, BBDT/Spaghetti), by the first pixel for
4-connectivity. So :func:`~ovseg_ros.core.postprocess.panoptic_from_semantic` numbers segments exactly as the
per-class labelling it replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


@dataclass
class Runs:
    """Maximal runs of one value within each row of an (H, W) map, in raster order.

    ``start``/``end`` are flat pixel indices (end exclusive); ``value`` the map's value on the run.
    """

    start: np.ndarray  # int64
    end: np.ndarray  # int64
    value: np.ndarray
    width: int

    @property
    def row(self) -> np.ndarray:
        return self.start // self.width

    @property
    def length(self) -> np.ndarray:
        return self.end - self.start


def row_runs(values: np.ndarray) -> Runs:
    """Split a non-empty (H, W) map into row runs (one comparison of neighbours, one ``flatnonzero``)."""
    h, w = values.shape
    flat = np.ascontiguousarray(values).ravel()
    change = np.empty(flat.size, dtype=bool)
    np.not_equal(flat[1:], flat[:-1], out=change[1:])
    change[::w] = True  # every row starts a run
    start = np.flatnonzero(change)
    end = np.empty_like(start)
    end[:-1] = start[1:]
    end[-1] = flat.size
    return Runs(start, end, flat[start], w)


def same_value_components(runs: Runs, members: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of equal value among the runs ``members`` (indices into ``runs``, ascending).

    Returns ``(component, key)``: per member its component (0..C-1, arbitrary order) and per component its
    first 2x2 block (``connectivity`` 8) or first pixel (4) in raster order, which orders the components as
    OpenCV numbers them. Two runs in adjacent rows touch when their columns overlap (4) or overlap or meet
    at a corner (8); only runs of one value are joined.
    """
    w = runs.width
    if members.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # Runs of the row above that a member touches form one contiguous range of runs (rows are partitions).
    below = members[runs.start[members] >= w]
    x0 = runs.start[below] % w
    x1 = x0 + (runs.end[below] - runs.start[below])  # exclusive
    above = runs.start[below] - w - x0  # flat index of the row above's first pixel
    reach = 1 if connectivity == 8 else 0
    lo = np.searchsorted(runs.start, above + np.maximum(x0 - reach, 0), side="right") - 1
    hi = np.searchsorted(runs.start, above + np.minimum(x1 - 1 + reach, w - 1), side="right") - 1
    count = hi - lo + 1
    src = np.repeat(below, count)
    offset = np.arange(src.size) - np.repeat(np.cumsum(count) - count, count)
    dst = np.repeat(lo, count) + offset
    joined = runs.value[src] == runs.value[dst]
    node = np.full(runs.start.size, -1, dtype=np.int64)
    node[members] = np.arange(members.size)
    a, b = node[src[joined]], node[dst[joined]]
    graph = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(members.size, members.size))
    n, component = connected_components(graph, directed=False)
    row = runs.start[members] // w
    x = runs.start[members] % w
    key = (row // 2) * ((w + 1) // 2) + x // 2 if connectivity == 8 else runs.start[members]
    # The smallest key per component: sort by key, take each component's first occurrence.
    by_key = np.argsort(key, kind="stable")
    _, first = np.unique(component[by_key], return_index=True)
    return component.astype(np.int64), key[by_key[first]]
