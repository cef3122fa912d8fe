"""Fully connected CRF (Krähenbühl & Koltun, NIPS 2011) in torch: deterministic, on any device.

CLIP-ES (Lin et al., CVPR 2023, https://github.com/linyq2117/CLIP-ES, ``eval_cam_with_crf.py``) and CaR
post-process their score maps with pydensecrf: 10 mean-field iterations, a Gaussian kernel (sxy=1,
compat=3) and a bilateral kernel (sxy=67, srgb=3, compat=4), unary ``-log(clip(p, 1e-5))``, Potts
compatibility and symmetric kernel normalisation. pydensecrf has no maintained wheels (``pydensecrf2`` on
PyPI is a source tarball needing a C++ toolchain and Cython), so this module re-implements the same
inference in torch:

* **Gaussian kernel**: exact, as a separable convolution truncated at 3 sigma (pydensecrf approximates it
  with the permutohedral lattice).
* **Bilateral kernel**: a permutohedral lattice (Adams, Baek & Davis, Eurographics 2010) written with torch
  tensor ops: splat with barycentric weights, blur with [1/2, 1, 1/2] along the d+1 lattice directions,
  slice. Vertex lookup uses sorted integer keys (``torch.unique`` + ``searchsorted``) instead of a hash
  table. Splat sums are sequential ``index_add_`` on the CPU and int64 fixed-point atomics on CUDA
  (integer addition is exact, float atomics are not), so results are bit-identical from run to run on
  each device.
* **Mean field** as pydensecrf's ``inference``: ``Q = softmax(-U)``, then ``Q = softmax(-U + Σ_k w_k·K̃_k Q)``
  where ``K̃ = n·K·n`` with ``n = (K·1)^-1/2`` (symmetric normalisation; the lattice's constant scale
  cancels) and ``w_k`` the Potts compatibilities.

Differences from pydensecrf: the exact Gaussian kernel; the colour input is the plain RGB image (the
authors pass BGR minus the ImageNet mean cast to uint8, which wraps around; channel order does not
matter for the isotropic kernel, the wrap-around does and is not reproduced).
"""

from __future__ import annotations

import math
from typing import Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .geometry import image_to_device
from .models import sync_free, upload

ArrayLike = Union[np.ndarray, torch.Tensor]


# --- permutohedral lattice -----------------------------------------------------------------------------
def _elevation_matrix(d: int) -> list[list[float]]:
    """(d, d+1) map from scaled features to the hyperplane Σx = 0 of Z^{d+1} (Adams et al., Sec. 3)."""
    inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
    scale = [inv_std / math.sqrt((i + 1) * (i + 2)) for i in range(d)]
    m = []
    for b in range(d):  # the elevation recursion applied to each basis vector
        cf = [scale[i] if i == b else 0.0 for i in range(d)]
        e = [0.0] * (d + 1)
        e[d] = -d * cf[d - 1]
        for i in range(d - 1, 0, -1):
            e[i] = e[i + 1] - i * cf[i - 1] + (i + 2) * cf[i]
        e[0] = e[1] + 2 * cf[0]
        m.append(e)
    return m


class Permutohedral:
    """A permutohedral lattice over (N, d) features; :meth:`filter` applies the Gaussian kernel ~exp(-|Δf|²/2).

    The lattice (vertex ids, barycentric weights, blur neighbours) is built once and reused
    for every filtering, as the CRF filters with the same features at every iteration.
    """

    def __init__(self, features: torch.Tensor) -> None:
        n, d = features.shape
        dev = features.device
        self.n, self.d = n, d
        d1 = d + 1
        elev = features.double() @ upload(_elevation_matrix(d), dev, torch.float64)  # (N, d+1)
        # Nearest remainder-0 point (ties go down, as in the reference implementation).
        rem0 = torch.ceil(elev / d1 - 0.5) * d1
        total = (rem0.sum(dim=1) / d1).round().long()  # (N,)
        diff = elev - rem0
        # rank[k]: how many coordinates are larger; ties rank the later index lower (reference rule), which
        # is the position in a stable descending sort.
        order = torch.argsort(-diff, dim=1, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(d1, device=dev).expand(n, d1).contiguous())
        # Walk back onto the lattice when the rounded point is off the hyperplane.
        tot = total[:, None]
        pos = (tot > 0) & (rank >= d1 - tot)
        neg = (tot < 0) & (rank < -tot)
        rem0 = rem0 - d1 * pos.double() + d1 * neg.double()
        rank = rank + tot - d1 * pos.long() + d1 * neg.long()
        # Barycentric coordinates.
        v = (elev - rem0) / d1
        bary = torch.zeros(n, d + 2, dtype=torch.float64, device=dev)
        bary.scatter_add_(1, d - rank, v)
        bary.scatter_add_(1, d + 1 - rank, -v)
        bary[:, 0] += 1.0 + bary[:, d + 1]
        self.weights = bary[:, :d1].float()  # (N, d+1)
        # Vertex keys: rem0 + canonical simplex offsets, first d coordinates (the last is implied).
        r = torch.arange(d1, device=dev)[None, :, None]  # remainder
        rk = rank[:, None, :d]  # (N, 1, d)
        offsets = torch.where(rk <= d - r, r, r - d1)  # (N, d+1, d)
        keys = rem0[:, None, :d].long() + offsets
        keys = keys.reshape(-1, d)
        lo = keys.min(dim=0).values - d1
        span = keys.max(dim=0).values - lo + d1 + 1
        strides = torch.ones(d, dtype=torch.long, device=dev)
        for i in range(d - 2, -1, -1):
            strides[i] = strides[i + 1] * span[i + 1]
        too_large = span.double().log2().sum() > 62
        self._lo, self._strides = lo, strides
        codes = ((keys - lo) * strides).sum(dim=1)
        if sync_free(dev):
            # torch.unique and the checks as one read: the vertex count (the lattice's size depends on the
            # image) and the overflow flag come back together, the lattice's only wait.
            ordered, perm = torch.sort(codes, stable=True)
            first = torch.ones_like(ordered, dtype=torch.bool)
            first[1:] = ordered[1:] != ordered[:-1]
            rank = torch.cumsum(first.long(), 0) - 1
            m, too = torch.stack([rank[-1] + 1, too_large.long()]).tolist()
            if too:
                raise ValueError("the lattice is too large to index; use coarser features (larger sxy/srgb)")
            self.codes = torch.zeros(m, dtype=codes.dtype, device=dev).scatter_(0, rank, ordered)
            inverse = torch.empty_like(rank).scatter_(0, perm, rank)
        else:
            if bool(too_large):
                raise ValueError("the lattice is too large to index; use coarser features (larger sxy/srgb)")
            self.codes, inverse = torch.unique(codes, sorted=True, return_inverse=True)
            m = self.codes.shape[0]
        self.m = m
        self.vertex = inverse.reshape(n, d1)  # (N, d+1) vertex id of each simplex corner
        # Largest number of entries splatted onto one vertex: bounds the fixed-point sums on CUDA (a device
        # scalar: read by nobody on the host).
        self.max_count = torch.zeros(m, dtype=torch.long, device=dev).scatter_add_(
            0, inverse, torch.ones_like(inverse)).max()
        # Unique keys back from codes, then blur neighbours along each lattice direction.
        ukeys = torch.empty(m, d, dtype=torch.long, device=dev)
        rest = self.codes.clone()
        for i in range(d):
            ukeys[:, i] = rest // strides[i]
            rest = rest - ukeys[:, i] * strides[i]
        ukeys = ukeys + lo
        self.neighbours = []
        for j in range(d1):
            step = torch.ones(d, dtype=torch.long, device=dev)
            if j < d:
                step[j] = -d
            self.neighbours.append((self._lookup(ukeys + step), self._lookup(ukeys - step)))

    def _lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Vertex ids of ``keys`` (K, d); ``m`` (the zero row) where no such vertex exists.

        Only used for blur neighbours, which differ from existing keys by at most d per coordinate, so the
        margins kept around the key range make every code valid."""
        codes = ((keys - self._lo) * self._strides).sum(dim=1)
        pos = torch.searchsorted(self.codes, codes).clamp_max(self.m - 1)
        return torch.where(self.codes[pos] == codes, pos, torch.full_like(pos, self.m))

    def filter(self, values: torch.Tensor, chunk_entries: int = 1 << 23) -> torch.Tensor:
        """(N, C) -> (N, C): about Σ_j k(f_i, f_j) v_j, up to a constant factor. Channels go in chunks
        so the (N·(d+1), C) splat buffer stays near ``chunk_entries`` values."""
        n, c = values.shape
        per = max(1, chunk_entries // max(1, n * (self.d + 1)))
        outs = []
        for s in range(0, c, per):
            lat = self._splat(values[:, s:s + per])
            for n1, n2 in self.neighbours:
                new = lat.clone()
                new[: self.m] += 0.5 * (lat[n1] + lat[n2])
                lat = new
            outs.append((self.weights[:, :, None] * lat[self.vertex]).sum(dim=1))
        return torch.cat(outs, dim=1)

    def _splat(self, v: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (M + 1, C) lattice values (last row: the zero 'missing' vertex)."""
        c = v.shape[1]
        if v.device.type == "cpu" and not sync_free(v.device):  # sequential index_add_: deterministic
            lat = torch.zeros(self.m + 1, c, dtype=v.dtype)
            for r in range(self.d + 1):
                lat.index_add_(0, self.vertex[:, r], self.weights[:, r:r + 1] * v)
            return lat
        # CUDA adds floats atomically in arbitrary order; integer adds are exact, so accumulate in fixed
        # point scaled so that no vertex sum can overflow int64 (precision ~ max|v| * count / 2^61).
        # The scale as a device scalar (float64, the same arithmetic as on the host): no wait per filtering.
        peak = v.abs().max().double()
        scale = 2.0 ** 61 / (peak * self.max_count).clamp_min(1e-30)
        acc = torch.zeros(self.m + 1, c, dtype=torch.int64, device=v.device)
        for r in range(self.d + 1):
            term = torch.round(self.weights[:, r:r + 1].double() * v.double() * scale).long()
            acc.index_add_(0, self.vertex[:, r], term)
        return (acc.double() / scale).to(v.dtype)


# --- Gaussian (spatial) kernel ----------------------------------------------------------------------------
def _gaussian_taps(sxy: float, device: torch.device) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sxy)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    return torch.exp(-0.5 * (x / sxy) ** 2)


def gaussian_filter(x: torch.Tensor, sxy: float) -> torch.Tensor:
    """(C, H, W) -> Σ_j exp(-|p_i - p_j|² / (2 sxy²)) x_j, exact up to 3 sigma, zero outside the image.

    Written as shifted sums (no convolution kernels) so it is deterministic and identical on every device.
    """
    taps = _gaussian_taps(sxy, x.device).to(x.dtype)
    r = (taps.shape[0] - 1) // 2
    _, h, w = x.shape
    p = F.pad(x, (r, r, 0, 0))
    y = sum(taps[k] * p[:, :, k:k + w] for k in range(2 * r + 1))
    p = F.pad(y, (0, 0, r, r))
    return sum(taps[k] * p[:, k:k + h, :] for k in range(2 * r + 1))


# --- the CRF -----------------------------------------------------------------------------------------------
def _to_tensor(a: ArrayLike, device: torch.device) -> torch.Tensor:
    return a.to(device) if isinstance(a, torch.Tensor) else image_to_device(a, device)


@torch.no_grad()
def dense_crf(
    image: ArrayLike,
    probs: ArrayLike,
    iterations: int = 10,
    gaussian_sxy: float = 1.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 67.0,
    bilateral_srgb: float = 3.0,
    bilateral_compat: float = 4.0,
    clip: float = 1e-5,
) -> ArrayLike:
    """Mean-field inference of a dense CRF; parameters default to CLIP-ES's (and CaR's).

    Args:
        image: (H, W, 3) uint8 RGB (numpy or torch), the colour guide of the bilateral kernel.
        probs: (C, H, W) non-negative class scores; need not sum to 1 (the unary is ``-log(clip(p))``, as
            pydensecrf's ``unary_from_softmax``). Its device is where the work happens.
        iterations: mean-field steps (0 returns the normalised probabilities).
        gaussian_sxy, gaussian_compat: spatial smoothness kernel (pixels) and its Potts weight.
        bilateral_sxy, bilateral_srgb, bilateral_compat: appearance kernel (pixels, intensity levels)
            and its Potts weight. A compat of 0 disables a kernel.
        clip: lower bound of ``probs`` before the log.

    Returns:
        (C, H, W) float32 marginals summing to 1 per pixel; numpy if ``probs`` was numpy, else a tensor
        on ``probs``' device. Deterministic: the same inputs give bit-identical outputs.
    """
    as_numpy = isinstance(probs, np.ndarray)
    device = probs.device if isinstance(probs, torch.Tensor) else torch.device("cpu")
    p = _to_tensor(probs, device).float()
    if p.dim() != 3:
        raise ValueError(f"probs must be (C, H, W), got shape {tuple(p.shape)}")
    c, h, w = p.shape
    img = _to_tensor(image, device)
    if tuple(img.shape) != (h, w, 3):
        raise ValueError(f"image must be ({h}, {w}, 3) to match probs, got {tuple(img.shape)}")
    unary = -torch.log(p.clamp(clip, 1.0))  # (C, H, W)
    q = torch.softmax(-unary, dim=0)
    kernels = []
    if gaussian_compat != 0 and iterations > 0:
        norm = gaussian_filter(torch.ones(1, h, w, device=device), gaussian_sxy).clamp_min(1e-20).rsqrt()

        def gauss(x: torch.Tensor, norm: torch.Tensor = norm) -> torch.Tensor:
            return norm * gaussian_filter(norm * x, gaussian_sxy)

        kernels.append((gaussian_compat, gauss))
    if bilateral_compat != 0 and iterations > 0:
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        feats = torch.cat(
            [xs.reshape(-1, 1) / bilateral_sxy, ys.reshape(-1, 1) / bilateral_sxy,
             img.reshape(-1, 3).float() / bilateral_srgb],
            dim=1,
        )
        lattice = Permutohedral(feats)
        bnorm = lattice.filter(torch.ones(h * w, 1, device=device)).clamp_min(1e-20).rsqrt()  # (N, 1)

        def bilateral(x: torch.Tensor, lattice: Permutohedral = lattice, bnorm: torch.Tensor = bnorm) -> torch.Tensor:
            flat = x.reshape(c, -1).T  # (N, C)
            return (bnorm * lattice.filter(bnorm * flat)).T.reshape(c, h, w)

        kernels.append((bilateral_compat, bilateral))
    for _ in range(iterations):
        energy = -unary
        for weight, kernel in kernels:
            energy = energy + weight * kernel(q)
        q = torch.softmax(energy, dim=0)
    return q.cpu().numpy() if as_numpy else q


def dense_crf_capped(image: np.ndarray, probs: torch.Tensor, max_side: int = 0, **params: float) -> torch.Tensor:
    """:func:`dense_crf` on a copy whose long side is at most ``max_side`` (0 = full size), marginals upsampled.

    The CRF's cost grows with the pixel count, so robots run it on a downscaled frame: the image is
    area-averaged, the probabilities resized bilinearly, and the (C, h, w) result resized back to (C, H, W).
    ``params`` are :func:`dense_crf`'s (iterations, kernel widths and compatibilities).
    """
    h, w = image.shape[:2]
    if max_side <= 0 or max(h, w) <= max_side:
        return dense_crf(image, probs, **params)
    s = max_side / max(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    small = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    p = F.interpolate(probs[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    q = dense_crf(small, p, **params)
    return F.interpolate(q[None], size=(h, w), mode="bilinear", align_corners=False)[0]
