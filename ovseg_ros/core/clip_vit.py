"""Dense-prediction seams into an open_clip VisionTransformer, shared by every ViT-based segmenter.

open_clip's ``VisionTransformer.forward`` returns one pooled vector; dense CLIP methods need the token
grid at any input size and surgery on the last block. These functions expose exactly that, in terms of
the model's own weights (``conv1``, ``positional_embedding``, ``transformer.resblocks[i]``, ``ln_post``,
``proj``), so they work on any open_clip ViT (OpenAI ViT-B/16 = ``ViT-B-16-quickgelu`` is the reference).

Shapes: images (B, 3, H, W) normalised; tokens (B, 1 + h*w, D) batch-first, CLS first;
per-head tensors (B, heads, N, head_dim).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn


def patch_size(visual: nn.Module) -> int:
    ps = visual.conv1.kernel_size
    return int(ps[0] if isinstance(ps, tuple) else ps)


def num_blocks(visual: nn.Module) -> int:
    return len(visual.transformer.resblocks)


def blocks(visual: nn.Module) -> nn.ModuleList:
    return visual.transformer.resblocks


def interpolate_pos_embed(visual: nn.Module, grid: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Positional embedding (1 + gh*gw, D) for a ``grid`` of patches, resized from the trained grid.

    Returns the original tensor when the grid matches. ``mode`` is ``bicubic`` (open_clip/ITACLIP) or
    ``bilinear`` (CLIP-ES). Resized tables are cached per (weights, device, dtype, grid, mode): a camera
    stream keeps one frame size, so the interpolation runs once, not per frame.
    """
    pos = visual.positional_embedding
    n0 = pos.shape[0] - 1
    g0 = int(math.isqrt(n0))
    if _tracing():  # export: symbolic sizes, so the table is computed in the graph, never cached
        return _resize_pos(pos, g0, grid, mode)
    if (g0, g0) == tuple(grid):
        return pos
    # _version changes on in-place writes (load_state_dict), so reloaded weights never hit a stale entry;
    # the weak reference guards against a new model's table reusing a freed one's id().
    key = (id(pos), pos._version, pos.device, pos.dtype, tuple(grid), mode)
    with _POS_LOCK:
        hit = _POS_CACHE.get(key)
        if hit is not None and hit[0]() is pos:
            _POS_CACHE.move_to_end(key)
            return hit[1]
    # A normal (not inference-mode) tensor, so gradient-based methods (CLIP-ES, CaR) can use cached entries.
    with torch.inference_mode(False), torch.no_grad():
        out = _resize_pos(pos, g0, grid, mode)
    with _POS_LOCK:
        _POS_CACHE[key] = (weakref.ref(pos), out)
        while len(_POS_CACHE) > _POS_CACHE_SIZE:
            _POS_CACHE.popitem(last=False)
    return out


def _resize_pos(pos: torch.Tensor, g0: int, grid: tuple[int, int], mode: str) -> torch.Tensor:
    cls_pos, patch_pos = pos[:1], pos[1:]
    patch_pos = patch_pos.reshape(1, g0, g0, -1).permute(0, 3, 1, 2).float()
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    patch_pos = F.interpolate(patch_pos, size=(grid[0], grid[1]), mode=mode, **kwargs)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


def _tracing() -> bool:
    """True while torch.export / the ONNX exporter traces the model (sizes are symbols there)."""
    return bool(torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing())


_POS_CACHE: "OrderedDict[tuple, tuple[weakref.ref, torch.Tensor]]" = OrderedDict()
_POS_CACHE_SIZE = 32
_POS_LOCK = threading.Lock()


def clear_pos_cache(keep: Optional[torch.device | str] = None) -> int:
    """Drop the resized position tables (all, or all but those on device ``keep``); returns how many.

    The entries are keyed by device, so after a model moves to the CPU its CUDA tables are never hit again
    but would hold GPU memory until evicted: :meth:`Segmenter.release_device_caches` calls this.
    """
    keep_dev = torch.device(keep) if keep is not None else None
    with _POS_LOCK:
        drop = [k for k, (_, t) in _POS_CACHE.items() if keep_dev is None or not _same_device(t.device, keep_dev)]
        for k in drop:
            del _POS_CACHE[k]
    return len(drop)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def embed(visual: nn.Module, images: torch.Tensor, pos_mode: str = "bicubic") -> tuple[torch.Tensor, tuple[int, int]]:
    """Patchify, add CLS and (resized) positional embeddings, apply ``ln_pre``: the input of block 1.

    Input H and W need not be multiples of the patch size (the conv drops the remainder, as open_clip does).
    """
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, D, gh, gw)
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)  # (B, N, D)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + interpolate_pos_embed(visual, grid, pos_mode).to(x.dtype)
    x = visual.ln_pre(x)
    return x, grid


def _batch_first(visual: nn.Module) -> bool:
    return bool(getattr(visual.transformer, "batch_first", True))


def run_block(block: nn.Module, x: torch.Tensor, batch_first: bool = True) -> torch.Tensor:
    """One unmodified residual block on batch-first tokens."""
    if batch_first:
        return block(x)
    return block(x.transpose(0, 1)).transpose(0, 1)


def run_blocks(
    visual: nn.Module,
    x: torch.Tensor,
    start: int = 0,
    stop: Optional[int] = None,
    capture: Iterable[int] = (),
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run blocks ``start..stop-1`` unmodified; return the output and the *inputs* of blocks in ``capture``.

    Block inputs are what intermediate-layer attention (ITACLIP) and Grad-CAM (CLIP-ES) need.
    """
    capture = set(capture)
    saved: dict[int, torch.Tensor] = {}
    bf = _batch_first(visual)
    res = blocks(visual)
    stop = len(res) if stop is None else stop
    for i in range(start, stop):
        if i in capture:
            saved[i] = x
        x = run_block(res[i], x, bf)
    return x, saved


def compile_blocks(visual: nn.Module) -> None:
    """Compile every residual block's ``forward`` in place with ``torch.compile`` (``nn.Module.compile``).

    Only calls of a whole block (:func:`run_block`) take the compiled path; the surgery code that reads a
    block's parts (``attn``, ``ln_1``, ...) and the weights' names are unchanged. The first frame of each new
    token count compiles (seconds), later ones reuse it. Measured on a 2-core CPU, fp32, ViT-B/16 blocks at
    561 tokens: 1.18x faster, outputs within 3e-6 (docs/benchmarks.md).
    """
    for block in blocks(visual):
        block.compile()


def qkv(block: nn.Module, x: torch.Tensor, normed: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head q, k, v (B, heads, N, head_dim) of ``block``'s attention for block input ``x``.

    ``normed=True`` means ``x`` is already ``ln_1(x)``.
    """
    attn: nn.MultiheadAttention = block.attn
    h = x if normed else block.ln_1(x)
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    b, n, d = q.shape
    heads = attn.num_heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, n, heads, d // heads).transpose(1, 2)

    return split(q), split(k), split(v)


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) per head: (B, heads, N, N)."""
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)


def attend(block: nn.Module, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Apply per-head attention weights (B, heads, N, N) to v and the block's output projection: (B, N, D)."""
    out = attn.to(v.dtype) @ v  # (B, heads, N, hd)
    b, heads, n, hd = out.shape
    out = out.transpose(1, 2).reshape(b, n, heads * hd)
    mha: nn.MultiheadAttention = block.attn
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias)


def layer_scale_1(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's first LayerScale (identity for OpenAI CLIP)."""
    ls = getattr(block, "ls_1", None)
    return ls(x) if ls is not None else x


def project_tokens(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``ln_post`` then ``proj`` on every token: (B, N, D) -> (B, N, E), not normalised."""
    x = visual.ln_post(x)
    if visual.proj is not None:
        x = x @ visual.proj
    return x


def patch_tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, 1 + h*w, C) tokens (CLS first) -> (B, C, h, w) map of patch tokens."""
    b, _, c = tokens.shape
    return tokens[:, 1:].transpose(1, 2).reshape(b, c, grid[0], grid[1])


def maskclip_last_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's reading of the last block: each token attends only to itself (value path), no residual,
    no FFN. ``out_proj(v(ln_1(x)))`` for every token."""
    _, _, v = qkv(block, x)
    b, heads, n, hd = v.shape
    out = v.transpose(1, 2).reshape(b, n, heads * hd)  # identity attention: each token keeps its own value
    mha: nn.MultiheadAttention = block.attn
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias)


def dense_features(
    visual: nn.Module,
    images: torch.Tensor,
    last_block: Callable[[nn.Module, torch.Tensor], torch.Tensor] = maskclip_last_block,
    pos_mode: str = "bicubic",
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Per-patch CLIP embeddings (B, E, h, w), L2-normalised, with ``last_block`` replacing the final block."""
    x, grid = embed(visual, images, pos_mode)
    x, _ = run_blocks(visual, x, 0, num_blocks(visual) - 1)
    x = last_block(blocks(visual)[-1], x)
    feats = F.normalize(project_tokens(visual, x), dim=-1)
    return patch_tokens_to_map(feats, grid), grid


def bare_forward(visual: nn.Module, images: torch.Tensor, pos_mode: str = "bicubic") -> torch.Tensor:
    """One unmodified forward of all blocks + projection at the input's size (the benchmark baseline)."""
    x, _ = embed(visual, images, pos_mode)
    x, _ = run_blocks(visual, x)
    return project_tokens(visual, x)


def class_scores(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine scores of (B, E, h, w) normalised features against (Q, E) normalised texts: (B, Q, h, w)."""
    return torch.einsum("bchw,qc->bqhw", features, text.to(features.dtype))


def max_over_names(scores: torch.Tensor, owner: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per class, the max over the rows of ``scores`` (…, Q, ...) at dim 1 that belong to it.

    ``owner`` (Q,) long gives each row's class. Classes may have different numbers of names.
    """
    shape = list(scores.shape)
    shape[1] = num_classes
    out = torch.full(shape, float("-inf"), dtype=scores.dtype, device=scores.device)
    idx = owner.view(1, -1, *([1] * (scores.dim() - 2))).expand_as(scores)
    return out.scatter_reduce(1, idx, scores, reduce="amax", include_self=True)
