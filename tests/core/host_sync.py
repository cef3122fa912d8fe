"""Count the operations that make the host wait for the device, on the CPU (no GPU needed).

On CUDA these block the Python thread until the queue drains: reading a value (``.item()``, ``int(t)``,
``bool(t)``, ``.tolist()``), ops whose output size depends on the data (``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``), copies to the host
(``.cpu()``/``.numpy()``; on the CPU ``.cpu()`` dispatches nothing, so the Python method is counted) and
blocking copies to the device (tensors made from host data: ``torch.tensor``, list indexing, seen as
``aten.lift_fresh``). A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten op, so a CPU
run shows what a CUDA run would wait on. One blind spot: ``t.to(device)`` of a host tensor dispatches nothing
when the device is the CPU, so a blocking upload written that way is only seen on a GPU; per-frame code sends
host data through ``models.upload`` instead. ``torch.cuda.set_sync_debug_mode`` is the on-device check
(``tests/core/test_cuda.py``; ``benchmarks/gpu_check.sh`` runs it).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {
    "aten._local_scalar_dense", "aten.nonzero", "aten.nonzero_static", "aten.masked_select", "aten.unique_dim",
    "aten._unique", "aten._unique2", "aten.unique_consecutive", "aten.bincount", "aten.equal", "aten.is_nonzero",
    "aten.histc", "aten.masked_scatter", "aten.argwhere",
}


#: (module file, function) of the non-blocking ways per-frame code sends host data to the device.
_UPLOADERS = {("models.py", "upload"), ("geometry.py", "image_to_device")}


def _inside(functions: set[tuple[str, str]], depth: int = 12) -> bool:
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        code = frame.f_code
        if (os.path.basename(code.co_filename), code.co_name) in functions:
            return True
        frame = frame.f_back
    return False


class _Mode(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        name = name if name.startswith("aten") else f"aten.{name}"
        if name == "aten.lift_fresh":  # a tensor made from host data
            # 0-d: a Python scalar in an op (``x[i] = 0``), passed by value, no copy. The sanctioned ways to
            # send host data (pinned non-blocking ``models.upload``, the frame's ``image_to_device``) do not wait.
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
                if _inside(_UPLOADERS):
                    self.counts.uploads += 1  # type: ignore[attr-defined]
                else:  # ``torch.tensor(..., device=cuda)``, list indexing: a blocking copy on a GPU
                    self.counts["aten.lift_fresh (host data to the device)"] += 1
        elif name in _SYNC_OPS and name != "aten.nonzero_static":
            self.counts[name] += 1
        elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None and len(args) == 1:
            self.counts["aten.repeat_interleave (no output_size)"] += 1
        elif name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                self.counts[f"{name} (boolean mask)"] += 1
        return func(*args, **kwargs)


@contextmanager
def count_host_syncs() -> Iterator[Counter]:
    """Counts of host-synchronising operations inside the block (``numpy``/``tolist`` reads included).

    Tensors made from host data count as blocking host-to-device copies, except through the non-blocking
    uploaders (``models.upload``, ``geometry.image_to_device``), which are tallied apart in ``counts.uploads``.
    """
    counts: Counter = Counter()
    counts.uploads = 0  # type: ignore[attr-defined]
    # Python-level reads: some C++ fast paths (``int(t)`` of an integer CPU tensor) skip the dispatcher.
    originals = {n: getattr(torch.Tensor, n) for n in ("tolist", "numpy", "cpu", "item", "__int__", "__float__", "__bool__")}

    def wrap(n: str):
        orig = originals[n]

        def read(self, *a, **k):  # noqa: ANN001, ANN202
            counts[f"Tensor.{n}"] += 1
            return orig(self, *a, **k)
        return read

    for n in originals:
        setattr(torch.Tensor, n, wrap(n))
    try:
        with _Mode(counts):
            yield counts
        # A read counted by its Python method and by the scalar op it dispatches is one wait, not two.
        scalar_reads = sum(counts[f"Tensor.{n}"] for n in ("item", "__int__", "__float__", "__bool__"))
        counts["aten._local_scalar_dense"] = max(0, counts["aten._local_scalar_dense"] - scalar_reads)
        if not counts["aten._local_scalar_dense"]:
            del counts["aten._local_scalar_dense"]
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)
