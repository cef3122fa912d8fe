"""The torch dense CRF (``ovseg_ros.core.crf``) against brute-force kernels and on its properties."""

from __future__ import annotations

import numpy as np
import torch

from ovseg_ros.core.crf import Permutohedral, dense_crf, gaussian_filter


def two_region_case(h: int = 24, w: int = 32, seed: int = 0):
    """A left/right two-colour image and noisy scores that favour the right class on each side."""
    rng = np.random.RandomState(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (180, 40, 40)
    img[:, w // 2:] = (40, 40, 180)
    img = (img + rng.randint(0, 4, img.shape)).astype(np.uint8)
    truth = np.zeros((h, w), np.int64)
    truth[:, w // 2:] = 1
    probs = rng.rand(2, h, w).astype(np.float32)
    probs[truth, np.arange(h)[:, None], np.arange(w)[None]] += 0.25  # weak, noisy evidence
    return img, probs, truth


def brute_force_crf(img, probs, iterations=10, gs=1.0, gw=3.0, bs=67.0, br=3.0, bw=4.0):
    """Mean field with exact O(N²) kernels and symmetric normalisation (self-pairs included, as the lattice)."""
    c, h, w = probs.shape
    ys, xs = np.mgrid[:h, :w]
    pos = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    col = img.reshape(-1, 3).astype(np.float64)
    kg = np.exp(-0.5 * ((pos[:, None] - pos[None]) ** 2).sum(-1) / gs**2)
    d_pos = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    d_col = ((col[:, None] - col[None]) ** 2).sum(-1)
    kb = np.exp(-0.5 * (d_pos / bs**2 + d_col / br**2))
    unary = -np.log(np.clip(probs.reshape(c, -1), 1e-5, 1))
    q = np.exp(-unary) / np.exp(-unary).sum(0)
    for _ in range(iterations):
        e = -unary.copy()
        for k, wgt in ((kg, gw), (kb, bw)):
            n = 1 / np.sqrt(k.sum(1))
            e += wgt * (n[None] * ((n[None] * q) @ k.T))
        q = np.exp(e - e.max(0)) / np.exp(e - e.max(0)).sum(0)
    return q.reshape(c, h, w)


def test_gaussian_filter_is_exact() -> None:
    x = torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(0))
    got = gaussian_filter(x, 1.0)
    ys, xs = np.mgrid[:9, :11]
    pos = np.stack([ys.ravel(), xs.ravel()], 1)
    d2 = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    k = np.exp(-0.5 * d2) * (np.abs(pos[:, None] - pos[None]).max(-1) <= 3)  # 3-sigma truncation per axis
    ref = (x.reshape(2, -1).double().numpy() @ k.T).reshape(2, 9, 11)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_permutohedral_approximates_gaussian_filter() -> None:
    rng = np.random.RandomState(1)
    f = torch.from_numpy(rng.rand(500, 5) * 4).float()
    v = torch.from_numpy(rng.rand(500, 3)).float()
    lat = Permutohedral(f)
    approx = (lat.filter(v) / lat.filter(torch.ones(500, 1))).numpy()
    k = np.exp(-0.5 * ((f[:, None].double() - f[None].double()) ** 2).sum(-1).numpy())
    exact = (k @ v.double().numpy()) / k.sum(1, keepdims=True)
    assert np.corrcoef(exact.ravel(), approx.ravel())[0, 1] > 0.95
    assert np.abs(exact - approx).mean() < 0.03


def test_crf_close_to_brute_force_and_cleans_noise() -> None:
    img, probs, truth = two_region_case()
    q = dense_crf(img, probs)
    ref = brute_force_crf(img, probs)
    assert q.shape == probs.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    assert (q.argmax(0) == ref.argmax(0)).mean() > 0.97
    assert np.abs(q - ref).mean() < 0.05
    assert (q.argmax(0) == truth).mean() > 0.99 > (probs.argmax(0) == truth).mean()


def test_crf_is_deterministic_and_typed() -> None:
    img, probs, _ = two_region_case(seed=2)
    a = dense_crf(img, probs)
    b = dense_crf(img, probs)
    assert np.array_equal(a, b)
    t = dense_crf(torch.from_numpy(img), torch.from_numpy(probs))
    assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), a)


def test_crf_without_pairwise_terms_returns_normalised_scores() -> None:
    img, probs, _ = two_region_case(seed=3)
    clipped = np.clip(probs, 1e-5, 1.0)  # pydensecrf's unary_from_softmax clips to [1e-5, 1]
    norm = clipped / clipped.sum(0, keepdims=True)
    np.testing.assert_allclose(dense_crf(img, probs, iterations=0), norm, rtol=1e-5, atol=1e-6)
    off = dense_crf(img, probs, iterations=5, gaussian_compat=0, bilateral_compat=0)
    np.testing.assert_allclose(off, norm, rtol=1e-5, atol=1e-6)


def test_capped_crf_equals_full_below_the_cap_and_keeps_the_size_above() -> None:
    import numpy as np
    import torch

    from ovseg_ros.core.crf import dense_crf, dense_crf_capped

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(3, 30, 40)).astype(np.float32)), 0)
    assert torch.equal(dense_crf_capped(image, probs, 0, iterations=3), dense_crf(image, probs, iterations=3))
    assert torch.equal(dense_crf_capped(image, probs, 40, iterations=3), dense_crf(image, probs, iterations=3))
    small = dense_crf_capped(image, probs, 20, iterations=3)
    assert small.shape == (3, 30, 40) and torch.allclose(small.sum(0), torch.ones(30, 40), atol=1e-4)
