"""Stage 1 of CLIP-ES, shared with CaR: softmax Grad-CAM on a CLIP ViT and class-aware attention affinity.

Method: Lin et al., "CLIP is Also an Efficient Segmenter: A Text-Driven Approach for Weakly Supervised
Semantic Segmentation", CVPR 2023 (arXiv 2212.09506); authors' code https://github.com/linyq2117/CLIP-ES.
CaR (Sun et al., CVPR 2024, google-research ``clip_as_rnn``) reuses the same stage for its mask proposals.
This is our own implementation on open_clip ViTs through :mod:`ovseg_ros.core.clip_vit`.

Pipeline for one image (``x`` normalised; :func:`prepare_image` resizes H and W up to patch multiples):

1. :meth:`ClipCam.encode` runs every block once without gradients. It keeps the input of the last block,
   the head- and layer-averaged patch-to-patch attention of the last ``attn_layers`` blocks (a running
   sum, so memory is one N x N map), and the image embedding: ``proj(mean of ln_post(patch tokens))``.
2. :meth:`ClipCam.gradcam` re-runs only the last block *with* gradients, the activation ``A = ln_1(x)``
   replicated once per target so a single backward gives every target's gradient (batched in chunks of
   ``max_batch``; ``grad_mode='vmap'`` instead runs one forward and a vmapped backward). The target is
   the softmax probability of the class over (texts ∪ background words) at temperature ``logit_scale``;
   CAM = ReLU(Σ_k mean_ij(∂s/∂A_k) A_k) on patch tokens, min-max normalised twice with the method's
   epsilon (``eps``: 1e-7 CLIP-ES, 1e-15 CaR), as the authors' ``compute_cam_per_layer`` then
   ``aggregate_multi_layers`` do.
3. :func:`affinity_from_attention`: Sinkhorn (column then row, ``rounds`` times) and symmetrisation,
   once per image: S = (D + Dᵀ)/2.
4. :func:`refine_with_affinity`: box mask B from the CAM at threshold λ, then S·(S·(B ⊙ cam)), which equals
   the authors' ``(S² ⊙ 1·Bᵀ)·cam`` at O(N²) per class instead of O(N³).

Weights stay frozen: gradients are taken with :func:`torch.autograd.grad` w.r.t. the activation only,
inside ``torch.enable_grad()`` around the last block, so nothing is left on the model (thread-safe).

Public API (stable; CaR imports it): :func:`prepare_image`, :class:`ClipCam` (``encode``, ``classify``,
``gradcam``, ``affinity``, ``__call__``), :class:`ImageEncoding`, :func:`sinkhorn`,
:func:`affinity_from_attention`, :func:`box_mask`, :func:`refine_with_affinity`, :func:`minmax_normalize`,
:func:`block_with_attention`, and the background word lists :data:`VOC_BACKGROUND`, :data:`COCO_BACKGROUND`.

Typical use (CaR)::

    cam = ClipCam(clip)                                  # logit_scale=100, last 8 blocks, 3 Sinkhorn rounds
    enc = cam.encode(prepare_image(clip, rgb_uint8))     # one ViT pass
    cams = cam.gradcam(enc, queries, background, range(len(queries)), retry_without_background=True)
    refined = refine_with_affinity(cam.affinity(enc), cams, threshold_lambda=0.4)   # (T, h, w) in [0, 1]
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import clip_vit
from .geometry import image_to_tensor, normalize, short_side_size
from .models import ClipModel, sync_free, upload

#: CLIP-ES background words for PASCAL VOC (``clip_text.py::BACKGROUND_CATEGORY``), 25 words.
VOC_BACKGROUND: tuple[str, ...] = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
    "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street", "valley",
    "bridge", "sign",
)
#: CLIP-ES / CaR background words for COCO: the VOC list without ``keyboard`` and ``sign``, 23 words.
COCO_BACKGROUND: tuple[str, ...] = tuple(w for w in VOC_BACKGROUND if w not in ("keyboard", "sign"))

#: Min-max epsilon of CLIP-ES (pytorch-grad-cam's ``scale_cam_image``). CaR's own copy of that function uses
#: 1e-15 (``modeling/model/cam.py``): each method passes its value (``ClipCam(eps=...)``). The epsilon matters
#: for classes of low probability, whose raw Grad-CAM maxima are of the order of the epsilon itself.
CLIP_ES_EPS = 1e-7
CAR_EPS = 1e-15
_EPS = CLIP_ES_EPS

#: How :func:`prepare_image` resamples: ``pil`` = the authors' torchvision ``Resize(BICUBIC)`` on a PIL image,
#: i.e. PIL's antialiased bicubic on the uint8 image (exact); ``torch`` = ``F.interpolate`` bicubic on floats
#: (antialiased when shrinking), kept for realtime presets where it measures faster.
RESIZE_MODES = ("pil", "torch")


# --- image ---------------------------------------------------------------------------------------------
def prepare_image(
    clip: ClipModel,
    image: np.ndarray,
    short_side: int = 0,
    max_long_side: int = 0,
    patch: Optional[int] = None,
    resize: str = "pil",
) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H', W') normalised tensor on the model's device and dtype.

    As the authors do, the whole image is resized bicubically to ``ceil(h/p)·p x ceil(w/p)·p`` where
    (h, w) is the input size, or the size with the short side at ``short_side`` (long side capped at
    ``max_long_side``) when those are > 0. ``resize='pil'`` (default) resamples exactly as both authors'
    ``_transform_resize``: PIL's bicubic on the uint8 image, the result is uint8 again. ``'torch'``: torch
    bicubic on floats, antialiased only when shrinking (differs from PIL by up to a few grey levels).
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    p = patch or clip_vit.patch_size(clip.visual)
    size = prepared_size(image.shape[0], image.shape[1], p, short_side, max_long_side)
    if resize == "pil" and tuple(image.shape[:2]) != size:
        image = pil_resize(image, size)
    x = image_to_tensor(image, clip.device)
    if tuple(x.shape[-2:]) != size:
        shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=shrink).clamp_(0, 1)
    mean, std = clip.pixel_stats()
    return normalize(x, mean, std).to(clip.dtype)


def prepared_size(h: int, w: int, patch: int, short_side: int = 0, max_long_side: int = 0) -> tuple[int, int]:
    """The (H', W') :func:`prepare_image` gives an h x w image: resized, then rounded up to patch multiples."""
    if short_side > 0:
        h, w = short_side_size(h, w, short_side, max_long_side)
    elif max_long_side > 0 and max(h, w) > max_long_side:
        s = max_long_side / max(h, w)
        h, w = max(1, round(h * s)), max(1, round(w * s))
    return max(patch, -(-h // patch) * patch), max(patch, -(-w // patch) * patch)


def pil_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 with PIL's bicubic filter (what torchvision's ``Resize`` does to a
    PIL image: ``Image.resize((w, h), BICUBIC)``, antialiased when shrinking)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    return np.array(img.resize((int(size[1]), int(size[0])), Image.BICUBIC))  # writable copy


#: The mean the authors' CRF scripts subtract from the BGR image (CLIP-ES ``eval_cam_with_crf.py``, CaR
#: ``crf.py``), here in RGB order.
CRF_MEAN_RGB = (122.675, 116.669, 104.008)


def authors_crf_image(image: np.ndarray) -> np.ndarray:
    """The image the authors' dense CRF sees: (H, W, 3) uint8 RGB minus the mean, cast to uint8, which wraps
    negative values around (numpy's float->uint8 cast on x86: truncate, then keep the low 8 bits). Channel
    order does not matter to the bilateral kernel (a Euclidean distance), so RGB order is kept."""
    x = np.asarray(image, dtype=np.float32) - np.asarray(CRF_MEAN_RGB, dtype=np.float32)
    return (np.trunc(x).astype(np.int64) & 255).astype(np.uint8)


# --- affinity ------------------------------------------------------------------------------------------
def sinkhorn(w: torch.Tensor, rounds: int = 3) -> torch.Tensor:
    """Alternate column and row normalisation of a positive (N, N) matrix, ``rounds`` times (column first).

    The authors do one (column, row) pass and then two more: ``rounds=3``. Rows sum to 1 afterwards.
    """
    d = w.float()
    for _ in range(rounds):
        d = d / d.sum(dim=0, keepdim=True).clamp_min(1e-12)
        d = d / d.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return d


def affinity_from_attention(attention: torch.Tensor, rounds: int = 3) -> torch.Tensor:
    """Averaged patch attention (N, N) -> class-agnostic affinity S = (D + Dᵀ)/2 with D = Sinkhorn(attention).

    The transition matrix of the paper is S^t (t = 2); it is never formed (see :func:`refine_with_affinity`).
    """
    d = sinkhorn(attention, rounds)
    return 0.5 * (d + d.transpose(0, 1))


def box_mask(cams: torch.Tensor, threshold: float, clip_edges: bool = False) -> torch.Tensor:
    """Per CAM, the union of the bounding boxes of the regions above ``threshold`` x max: (T, h, w) bool.

    Follows ``scoremap2bbox``: the CAM is quantised to uint8 (``uint8(255·cam)``), pixels strictly above
    ``int(threshold · max)`` are foreground, and every 8-connected region contributes its bounding box
    (cv2 ``findContours`` with ``RETR_TREE`` returns the outer contours of those regions; hole contours lie
    inside them). An all-zero CAM gives an empty mask.

    The authors clip the exclusive box end to ``size - 1``, so the last column and row are never inside a box
    and a region touching only them is lost. ``clip_edges=True`` reproduces that; the default keeps boxes
    that reach the right/bottom edge whole (we see no reason to treat those edges differently from the
    left/top ones).
    """
    t, h, w = cams.shape
    if sync_free(cams.device) and 0 < h * w <= BOX_DEVICE_MAX_PATCHES:
        return _box_mask_on_device(cams, threshold, clip_edges)
    q = (cams.detach().float().clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()  # truncation, as astype
    out = np.zeros((t, h, w), dtype=bool)
    for i in range(t):
        thr = int(threshold * int(q[i].max()))
        fg = (q[i] > thr).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
        for x0, y0, bw, bh, _ in stats[1:n]:
            x1, y1 = x0 + bw, y0 + bh
            if clip_edges:
                x1, y1 = min(x1, w - 1), min(y1, h - 1)
            out[i, y0:y1, x0:x1] = True
    return torch.from_numpy(out).to(cams.device)


#: Largest patch grid whose box mask is computed on the device in the sync-free mode (GPU): the reachability
#: products cost O(N³) per CAM, well under 1 ms for N = 2048 at fp16 on a datacentre GPU; larger grids copy the CAMs
#: to the host for OpenCV (one wait per call), which only the paper presets' full-size inputs reach.
BOX_DEVICE_MAX_PATCHES = 2048

_GRID_CACHE: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _grid(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, N) bool 8-neighbourhood of an h x w grid (self included) and the (N,) y and x of every cell."""
    key = (h, w, str(device))
    hit = _GRID_CACHE.get(key)
    if hit is None:
        ys = torch.arange(h, device=device).repeat_interleave(w, output_size=h * w)
        xs = torch.arange(w, device=device).repeat(h)
        near = ((ys[:, None] - ys[None, :]).abs() <= 1) & ((xs[:, None] - xs[None, :]).abs() <= 1)
        hit = (near, ys, xs)
        if len(_GRID_CACHE) > 16:
            _GRID_CACHE.clear()
        _GRID_CACHE[key] = hit
    return hit


def _box_mask_on_device(cams: torch.Tensor, threshold: float, clip_edges: bool) -> torch.Tensor:
    """:func:`box_mask` without leaving the device (no host wait), for the sync-free mode.

    The 8-connected regions come from reachability: with A the foreground adjacency (self loops included),
    ``ceil(log2 N)`` boolean squarings of A reach along every path of up to N - 1 steps, a fixed count
    whatever the image. The 0/1 products are exact in fp16 (a positive count never rounds to zero). Each
    foreground cell then knows its region's box; a cell is in the mask when some box holds it.
    """
    t, h, w = cams.shape
    n = h * w
    near, ys, xs = _grid(h, w, cams.device)
    q = (cams.detach().float().clamp(0, 1) * 255).to(torch.uint8).reshape(t, n)  # truncation, as astype
    qmax = q.amax(dim=1, keepdim=True).double()
    fg = q.double() > torch.floor(threshold * qmax)  # int(threshold * int(max)) as box_mask (non-negative)
    dtype = torch.float16 if cams.device.type == "cuda" else torch.float32
    reach = (near[None] & fg[:, :, None] & fg[:, None, :]).to(dtype)  # (t, N, N)
    for _ in range(max(1, n - 1).bit_length()):
        reach = (reach @ reach > 0).to(dtype)
    linked = reach > 0
    ys, xs = ys.int(), xs.int()
    y0 = torch.where(linked, ys, n).amin(-1)  # (t, N): the box of each cell's region
    x0 = torch.where(linked, xs, n).amin(-1)
    y1 = torch.where(linked, ys, -1).amax(-1) + 1  # exclusive ends, as x0 + width of cv2's stats
    x1 = torch.where(linked, xs, -1).amax(-1) + 1
    if clip_edges:
        y1, x1 = y1.clamp(max=h - 1), x1.clamp(max=w - 1)
    inside = ((y0[:, :, None] <= ys) & (ys < y1[:, :, None]) & (x0[:, :, None] <= xs) & (xs < x1[:, :, None])
              & fg[:, :, None])  # (t, region cell, cell)
    return inside.any(dim=1).reshape(t, h, w)


def minmax_normalize(x: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Per map of (T, ...): (x - min) / (max(x - min) + eps), as ``scale_cam_image`` (CLIP-ES: eps 1e-7,
    CaR: 1e-15)."""
    flat = x.reshape(x.shape[0], -1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / (flat.max(dim=1, keepdim=True).values + eps)
    return flat.reshape(x.shape)


def refine_with_affinity(
    affinity: torch.Tensor,
    cams: torch.Tensor,
    threshold_lambda: float,
    power: int = 2,
    clip_box_edges: bool = False,
    mask: Optional[torch.Tensor] = None,
    eps: float = _EPS,
) -> torch.Tensor:
    """Class-aware attention affinity (CAA): (T, h, w) CAMs -> refined (T, h, w) in [0, 1].

    Computes ``S^power · (B ⊙ cam)`` as ``power`` matrix-vector products per class (O(N²) each, all classes in
    one matmul), which equals the authors' ``(S^power ⊙ 1·Bᵀ) · cam``: the box mask selects the *source*
    patches (columns). Result min-max normalised per class with ``eps`` (the method's, see :data:`CAR_EPS`).
    ``mask`` (T, h, w) bool replaces the box mask.
    """
    t, h, w = cams.shape
    if mask is None:
        mask = box_mask(cams, threshold_lambda, clip_box_edges)
    # float64 for the products: the factored S·(S·x) accumulates N-term sums twice, and in float32 it rounded
    # 3-4.5x more than the authors' (S·S)·x did (multi-tag images below 99.9 % label agreement); in float64 it
    # costs little (N <= a few thousand patches, T classes) and agrees with theirs above 99.9 %.
    s = affinity.to(cams.device, torch.float64)
    x = (cams.double() * mask.to(cams.device, torch.float64)).reshape(t, h * w).transpose(0, 1)  # (N, T)
    for _ in range(power):
        x = s @ x
    return minmax_normalize(x.transpose(0, 1).reshape(t, h, w), eps).float()


# --- the ViT ---------------------------------------------------------------------------------------------
@dataclass
class ImageEncoding:
    """One image through the frozen ViT: what the CAM, the affinity and the classification reuse.

    Attributes:
        block_input: (1, 1 + N, D) input of the last block (CLS first), no autograd history.
        grid: (h, w) patch grid, N = h·w.
        attention: (N, N) float32 patch-to-patch attention averaged over heads and the last ``attn_layers``
            blocks (CLS row and column dropped), or None when not requested.
        embedding: (1, E) float32 L2-normalised image embedding: ``proj(mean(ln_post(patch tokens)))``.
    """

    block_input: torch.Tensor
    grid: tuple[int, int]
    attention: Optional[torch.Tensor]
    embedding: torch.Tensor


def _layer_scale(block: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    ls = getattr(block, name, None)
    return ls(x) if ls is not None else x


def _mlp_residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + _layer_scale(block, "ls_2", block.mlp(block.ln_2(x)))


def _merge_heads(block: nn.Module, out: torch.Tensor) -> torch.Tensor:
    b, heads, n, hd = out.shape
    mha: nn.MultiheadAttention = block.attn
    return F.linear(out.transpose(1, 2).reshape(b, n, heads * hd), mha.out_proj.weight, mha.out_proj.bias)


def block_with_attention(
    block: nn.Module, x: torch.Tensor, max_elements: int = 1 << 27
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block on (1, L, D) tokens, also returning its head-averaged attention (L, L) in float32.

    Heads are processed in chunks so at most ``max_elements`` attention weights exist at a time (a 1080p
    frame has ~8,000 tokens: 12 heads at once would be 3 GB in fp32).
    """
    q, k, v = clip_vit.qkv(block, x)
    heads, n = q.shape[1], q.shape[2]
    chunk = max(1, min(heads, max_elements // max(1, n * n)))
    outs, attn_sum = [], torch.zeros((n, n), dtype=torch.float32, device=x.device)
    for s in range(0, heads, chunk):
        p = clip_vit.attention_probs(q[:, s:s + chunk], k[:, s:s + chunk])
        attn_sum += p[0].float().sum(dim=0)
        outs.append(p @ v[:, s:s + chunk])
    y = x + _layer_scale(block, "ls_1", _merge_heads(block, torch.cat(outs, dim=1)))
    return _mlp_residual(block, y), attn_sum / heads


def _pool(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L, D) last-block output -> (B, E) float32 normalised embedding of the mean patch token."""
    return _pool_with(visual.ln_post, visual.proj, tokens)


def _pool_with(ln_post: nn.Module, proj: Optional[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    f = ln_post(tokens)[:, 1:].mean(dim=1)
    if proj is not None:
        f = f @ proj
    return F.normalize(f.float(), dim=-1)


def _last_block_from_ln1(block: nn.Module, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The last block with its ``ln_1`` output ``a`` (B, L, D) given (the Grad-CAM layer); ``x`` is its input.

    ``ln_1`` feeds only the attention branch, so this equals the block's forward for ``a = ln_1(x)``.
    """
    q, k, v = clip_vit.qkv(block, a, normed=True)
    attn = F.scaled_dot_product_attention(q, k, v)  # memory-efficient in forward and backward
    y = x + _layer_scale(block, "ls_1", _merge_heads(block, attn))
    return _mlp_residual(block, y)


class _EncodeGraph(nn.Module):
    """The vocabulary-independent part of a CAM method: the ViT pass of :meth:`ClipCam.encode` (the Grad-CAM's
    last-block backward stays in torch: an ONNX Runtime inference session has no backward)."""

    def __init__(self, cam: "ClipCam", with_attention: bool) -> None:
        super().__init__()
        self.visual = cam.visual  # registers the weights
        self._cam, self._with_attention = cam, with_attention

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        enc = self._cam._encode(image, self._with_attention)
        if enc.attention is None:
            return enc.block_input, enc.embedding
        return enc.block_input, enc.attention, enc.embedding


def _mask_rows(logits: torch.Tensor, live: Optional[torch.Tensor]) -> torch.Tensor:
    """Logits (B, Q) with the rows not ``live`` (B, Q) out of the softmax: the lowest finite value, so their
    probability is exactly 0 and a row set that is all masked gives a uniform softmax, never NaN."""
    if live is None:
        return logits
    return logits.masked_fill(~live.to(logits.device), torch.finfo(logits.dtype).min)


class ClipCam:
    """Softmax Grad-CAM and attention affinity on a frozen open_clip ViT (see the module docstring).

    Args:
        clip: the loaded model (weights must not require grad; :func:`load_clip` freezes them).
        logit_scale: softmax temperature of the target; 100 = pretrained CLIP's ``exp(logit_scale)``
            (set it explicitly: random test models carry ln(1/0.07)).
        attn_layers: how many final blocks' attention the affinity averages (8 of 12 in the paper).
        sinkhorn_rounds: (column, row) normalisation rounds (3 in the authors' code).
        pos_mode: positional-embedding interpolation (``bilinear`` as the authors).
        max_batch: targets per batched last-block forward/backward (caps memory: each target holds one
            copy of the last block's activations).
        attention_budget: attention weights materialised at once while encoding (heads are chunked).
        grad_mode: ``replicate`` runs the last block on one copy of the activation per target and one
            backward; ``vmap`` runs it once and batches only the backward (``torch.autograd.grad`` with
            ``is_grads_batched``), saving (targets - 1) block forwards where vmap has batching rules for
            every backward op (checked on CPU; the default stays ``replicate``, which needs none).
        eps: min-max epsilon of the CAM normalisation (:data:`CLIP_ES_EPS` 1e-7, :data:`CAR_EPS` 1e-15).
    """

    def __init__(
        self,
        clip: ClipModel,
        logit_scale: float = 100.0,
        attn_layers: int = 8,
        sinkhorn_rounds: int = 3,
        pos_mode: str = "bilinear",
        max_batch: int = 8,
        attention_budget: int = 1 << 27,
        grad_mode: str = "replicate",
        eps: float = _EPS,
    ) -> None:
        if grad_mode not in ("replicate", "vmap"):
            raise ValueError(f"grad_mode must be 'replicate' or 'vmap', got {grad_mode!r}")
        self.grad_mode = grad_mode
        self.clip = clip
        self.logit_scale = float(logit_scale)
        self.attn_layers = int(attn_layers)
        self.sinkhorn_rounds = int(sinkhorn_rounds)
        self.pos_mode = pos_mode
        self.max_batch = max(1, int(max_batch))
        self.attention_budget = int(attention_budget)
        self.eps = float(eps)
        self._head32: Optional[tuple[tuple, tuple[nn.Module, nn.Module, Optional[torch.Tensor]]]] = None
        self._head_lock = threading.Lock()

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    def _grad_head(self) -> tuple[nn.Module, nn.Module, Optional[torch.Tensor]]:
        """(last block, ln_post, proj) in float32: what the Grad-CAM forward and backward run through.

        An fp16 backward is not safe here: the target is a softmax probability at temperature 100, and for a
        class the image does not favour (p ~ 1e-6 and less) the gradient entering the block is below fp16's
        smallest subnormal (6e-8), so the CAM comes out all zero (tests/core/test_precision.py shows it).
        With an fp16/bf16 model (``precision: auto`` on CUDA) an fp32 copy of these three parts is kept
        (ViT-B/16: 7 M parameters, 28 MB), rebuilt when the weights move or change; the rest of the image
        pass stays in the model's dtype.
        """
        visual = self.visual
        block = clip_vit.blocks(visual)[-1]
        w = block.attn.in_proj_weight
        if w.dtype == torch.float32:
            self._head32 = None
            return block, visual.ln_post, visual.proj
        key = (w.device, w.dtype, w.data_ptr(), w._version)
        with self._head_lock:
            if self._head32 is None or self._head32[0] != key:
                with torch.inference_mode(False), torch.no_grad():
                    proj = None if visual.proj is None else visual.proj.detach().float().clone()
                    self._head32 = (key, (copy.deepcopy(block).float(), copy.deepcopy(visual.ln_post).float(), proj))
            return self._head32[1]

    # --- forward without gradients ----------------------------------------------------------------
    @torch.no_grad()
    def encode(self, image: torch.Tensor, with_attention: bool = True,
               encoder: Optional[Callable[[torch.Tensor], list[torch.Tensor]]] = None) -> ImageEncoding:
        """Run the ViT once on a (1, 3, H, W) normalised image.

        H and W that are not patch multiples are first resized up to the next multiples (bicubic), as the
        authors do; :func:`prepare_image` already delivers such sizes. ``encoder``: the exported graph of
        :meth:`encode_graph` (ONNX Runtime, :mod:`.deploy`) instead of the torch ViT.
        """
        if image.shape[0] != 1:
            raise ValueError(f"ClipCam encodes one image at a time, got a batch of {image.shape[0]}")
        visual = self.visual
        p = clip_vit.patch_size(visual)
        h, w = image.shape[-2:]
        if h % p or w % p:
            size = (-(-h // p) * p, -(-w // p) * p)
            image = F.interpolate(image.float(), size=size, mode="bicubic", align_corners=False).to(image.dtype)
        if encoder is not None:
            outs = encoder(image)
            has_attention = len(outs) == 3
            if has_attention or not with_attention:
                grid = (image.shape[-2] // p, image.shape[-1] // p)
                return ImageEncoding(outs[0].to(self.clip.dtype), grid, outs[1] if has_attention and with_attention
                                     else None, outs[-1])
        return self._encode(image, with_attention)

    def _encode(self, image: torch.Tensor, with_attention: bool) -> ImageEncoding:
        visual = self.visual
        res = clip_vit.blocks(visual)
        n_blocks = len(res)
        first = n_blocks - self.attn_layers if with_attention and self.attn_layers > 0 else n_blocks
        x, grid = clip_vit.embed(visual, image, self.pos_mode)
        attn_sum: Optional[torch.Tensor] = None
        batch_first = bool(getattr(visual.transformer, "batch_first", True))
        for i in range(n_blocks - 1):
            if i >= first:
                x, p = block_with_attention(res[i], x, self.attention_budget)
                attn_sum = p if attn_sum is None else attn_sum + p
            else:
                x = clip_vit.run_block(res[i], x, batch_first)
        block_input = x
        if first < n_blocks:
            out, p = block_with_attention(res[-1], x, self.attention_budget)
            attn_sum = p if attn_sum is None else attn_sum + p
        else:
            out = clip_vit.run_block(res[-1], x, batch_first)
        attention = None
        if attn_sum is not None:
            attention = (attn_sum / (n_blocks - first))[1:, 1:].contiguous()
        return ImageEncoding(block_input, grid, attention, _pool(visual, out))

    def encode_graph(self, with_attention: bool) -> nn.Module:
        """:meth:`encode` as a module for ONNX export: image -> (block input, [attention,] embedding)."""
        return _EncodeGraph(self, with_attention)

    def classify(self, enc: ImageEncoding, text: torch.Tensor) -> torch.Tensor:
        """(Q,) softmax over the (Q, E) normalised ``text`` of the image embedding, at ``logit_scale``.

        The same quantity Grad-CAM differentiates; for deciding which classes are present per frame.
        """
        return torch.softmax(self.logit_scale * enc.embedding[0] @ text.to(enc.embedding).T, dim=-1)

    def affinity(self, enc: ImageEncoding) -> torch.Tensor:
        """S (N, N): Sinkhorn-normalised, symmetrised attention of ``enc`` (once per image)."""
        if enc.attention is None:
            raise ValueError("the encoding has no attention; call encode(..., with_attention=True)")
        return affinity_from_attention(enc.attention, self.sinkhorn_rounds)

    # --- Grad-CAM -----------------------------------------------------------------------------------
    def gradcam(
        self,
        enc: ImageEncoding,
        text: torch.Tensor,
        background: Optional[torch.Tensor],
        targets: Sequence[int],
        retry_without_background: bool = False,
        text_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Softmax Grad-CAMs (T', h, w) float32 in [0, 1] for rows ``targets`` of ``text``.

        Args:
            text: (T, E) normalised query embeddings (the softmax competitors that can be targets).
            background: (G, E) normalised background-word embeddings added to the softmax, or None.
            targets: indices into ``text``, one CAM each, in this order.
            retry_without_background: CaR's rule: a CAM that comes out all zero is recomputed with the
                softmax over ``text`` only.
            text_mask: (T,) bool on the device, the rows of ``text`` that compete (None: all); the others
                leave the softmax, so fixed-shape callers need not read on the host which rows are live.

        In the sync-free mode (:func:`~ovseg_ros.core.models.sync_free`) the retry is decided on the device:
        every target's CAM without background words joins the same batched backward (twice the last-block
        work: 1.3-1.6x the Grad-CAM time on the CPU, ``benchmarks/bench_host_sync.py``, against a read per CAM)
        and replaces the CAMs that came out all zero.
        """
        targets = [int(t) for t in targets]
        h, w = enc.grid
        if not targets:
            return torch.zeros((0, h, w), dtype=torch.float32, device=enc.block_input.device)
        full = text if background is None or background.shape[0] == 0 else torch.cat([text, background.to(text)])
        live = None
        if text_mask is not None:  # background rows always compete
            live = torch.ones(full.shape[0], dtype=torch.bool, device=text_mask.device)
            live[: text.shape[0]] = text_mask
        retry = retry_without_background and full.shape[0] > text.shape[0]
        if retry and sync_free(enc.block_input.device):
            no_bg = torch.zeros(full.shape[0], dtype=torch.bool, device=full.device)
            no_bg[: text.shape[0]] = True if text_mask is None else text_mask.to(full.device)
            with_bg = torch.ones_like(no_bg) if live is None else live.to(full.device)
            masks = torch.cat([with_bg.expand(len(targets), -1), no_bg.expand(len(targets), -1)])
            both = self._gradcam_rows(enc, full, targets + targets, masks)
            cams, redo = both[: len(targets)], both[len(targets):]
            return torch.where(cams.flatten(1).amax(1).view(-1, 1, 1) <= 0.0, redo, cams)
        cams = (self._gradcam_rows(enc, full, targets) if live is None
                else self._gradcam_rows(enc, full, targets, live.expand(len(targets), -1)))
        if retry:
            empty = [i for i in range(len(targets)) if float(cams[i].max()) <= 0.0]
            if empty:
                redo = self._gradcam_rows(enc, text, [targets[i] for i in empty])
                cams[empty] = redo
        return cams

    def _gradcam_rows(self, enc: ImageEncoding, text: torch.Tensor, targets: list[int],
                      live: Optional[torch.Tensor] = None) -> torch.Tensor:
        chunks = [self._gradcam_batch(enc, text, targets[s:s + self.max_batch],
                                      None if live is None else live[s:s + self.max_batch])
                  for s in range(0, len(targets), self.max_batch)]
        return torch.cat(chunks)

    def _gradcam_batch(self, enc: ImageEncoding, text: torch.Tensor, targets: list[int],
                       live: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``live`` (B, Q) bool: per target, the rows of ``text`` in its softmax (None: all)."""
        block, ln_post, proj = self._grad_head()
        b = len(targets)
        h, w = enc.grid
        # inference_mode(False): callers may hold inference mode; clones below are then normal tensors.
        with torch.inference_mode(False), torch.enable_grad():
            x = enc.block_input.clone().to(block.ln_1.weight.dtype)
            rows = text.clone()
            with torch.no_grad():
                a0 = block.ln_1(x)
            tgt = (torch.arange(targets[0], targets[0] + b, device=x.device)
                   if targets == list(range(targets[0], targets[0] + b)) else upload(targets, x.device))
            if self.grad_mode == "replicate":
                # One copy of the activation per target: the copies never interact, so one backward of the
                # summed target probabilities yields each target's own gradient in its own copy.
                a = a0.expand(b, -1, -1).clone().requires_grad_(True)
                out = _last_block_from_ln1(block, x, a)
                emb = _pool_with(ln_post, proj, out)  # (B, E)
                probs = torch.softmax(_mask_rows(self.logit_scale * emb @ rows.to(emb).T, live), dim=-1)
                picked = probs[torch.arange(b, device=probs.device), tgt]
                (grad,) = torch.autograd.grad(picked.sum(), a)
            else:
                # One forward; the backward is vmapped over one-hot cotangents, one per target.
                a = a0.clone().requires_grad_(True)
                emb = _pool_with(ln_post, proj, _last_block_from_ln1(block, x, a))  # (1, E)
                logits = self.logit_scale * emb @ rows.to(emb).T  # (1, Q)
                if live is not None:  # per-target row sets: one softmax per target, still one forward
                    logits = logits.expand(b, -1)
                probs = torch.softmax(_mask_rows(logits, live), dim=-1)  # (1 or B, Q)
                # (B, 1, Q); F.one_hot would read the indices' range on the host
                onehot = (tgt[:, None] == torch.arange(probs.shape[-1], device=tgt.device)).to(probs.dtype)[:, None, :]
                if live is not None:  # target i's cotangent touches only its own softmax row
                    onehot = onehot * torch.eye(b, dtype=probs.dtype, device=probs.device)[:, :, None]
                (grad,) = torch.autograd.grad(probs, a, grad_outputs=onehot, is_grads_batched=True)
                grad = grad[:, 0]  # (B, L, D)
        with torch.no_grad():
            act = a0[0, 1:].float()  # (N, D), the same for every target
            weights = grad[:, 1:].float().mean(dim=1)  # (B, D): spatially averaged gradients
            cam = torch.relu(weights @ act.T).reshape(b, h, w)
            # Both authors normalise twice (per target layer, then after averaging the one layer): with a
            # maximum near eps the second pass is not a no-op.
            return minmax_normalize(minmax_normalize(cam, self.eps), self.eps)

    # --- everything at once -------------------------------------------------------------------------
    def __call__(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        background: Optional[torch.Tensor],
        targets: Sequence[int],
        retry_without_background: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cams (T', h, w) in [0, 1] at patch resolution, affinity S (N, N)) for one normalised image."""
        enc = self.encode(image)
        cams = self.gradcam(enc, text, background, targets, retry_without_background)
        return cams, self.affinity(enc)
