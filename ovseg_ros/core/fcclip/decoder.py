"""Mask2Former's masked-attention decoder with FC-CLIP's in-vocabulary (text-embedding) class head.

Decoder: Cheng et al., CVPR 2022 (arXiv 2112.01527), https://github.com/facebookresearch/Mask2Former.
Class head: Yu et al., "Convolutions Die Hard: Open-Vocabulary Segmentation with Single Frozen
Convolutional CLIP" (FC-CLIP), NeurIPS 2023 (arXiv 2308.02487), https://github.com/bytedance/fc-clip.

Learned queries go through ``num_layers`` post-norm layers of cross-attention (to one pixel-decoder level
at a time, coarse to fine, cycling), self-attention and FFN. Each cross-attention only sees the pixels the
query's previous mask predicts (sigmoid >= 0.5); a query whose mask is empty at that level sees everything.
Masks are the dot product of a 3-layer MLP of the normalised query with the per-pixel mask features.

The class head pools the mask features under the query's binarised mask, projects them (LayerNorm + Linear),
adds the normalised query and maps the sum by a 3-layer MLP into CLIP's text space; logits are cosine
similarities to the text embeddings times a learned scale, max over each class's synonyms, plus a learned
"void" embedding as the last column.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP, sine_position_embedding


def mask_pool(features: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Average ``features`` (B, C, H, W) over each binarised mask (B, Q, h, w) (logit > 0) -> (B, Q, C).

    Masks of another size are first resized bilinearly to the features. Empty masks give zeros.
    """
    if mask_logits.shape[-2:] != features.shape[-2:]:
        mask_logits = F.interpolate(mask_logits, size=features.shape[-2:], mode="bilinear", align_corners=False)
    mask = (mask_logits > 0).float()
    # Weights in fp32, then the features' dtype: in fp16 (the CLIP on CUDA) the former "+ 1e-8" rounded to 0
    # and an empty mask gave 0/0 = NaN for every later score (tests/core/test_precision.py). A count is
    # 0 or >= 1, so the clamp changes nothing else.
    weights = mask / mask.sum(dim=(-1, -2), keepdim=True).clamp(min=1.0)
    return torch.einsum("bchw,bqhw->bqc", features, weights.to(features.dtype))


def max_over_names(logits: torch.Tensor, owner: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(..., T) per-name logits -> (..., K) per-class max, with ``owner`` (T,) the class of each name."""
    out = logits.new_full((*logits.shape[:-1], num_classes), float("-inf"))
    return out.scatter_reduce(-1, owner.expand_as(logits), logits, reduce="amax", include_self=True)


def text_logits(embeddings: torch.Tensor, text: torch.Tensor, owner: torch.Tensor, num_classes: int,
                log_scale: torch.Tensor) -> torch.Tensor:
    """Cosine of (B, Q, D) ``embeddings`` with normalised (T, D) ``text`` x exp(log_scale) clamped at 100,
    max over the names of each class -> (B, Q, K)."""
    scale = log_scale.exp().clamp(max=100)
    cos = F.normalize(embeddings, dim=-1) @ text.to(embeddings.dtype).T
    return max_over_names(scale * cos, owner, num_classes)


class DecoderLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN, each followed by residual + LayerNorm."""

    def __init__(self, dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_norm = nn.LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.ffn_out = nn.Linear(ffn_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, q: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor,
                attn_mask: torch.Tensor) -> torch.Tensor:
        att = self.cross_attn(q + query_pos, memory + memory_pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        q = self.cross_norm(q + att)
        qk = q + query_pos
        q = self.self_norm(q + self.self_attn(qk, qk, q, need_weights=False)[0])
        return self.ffn_norm(q + self.ffn_out(F.relu(self.ffn_in(q))))


class MaskedAttentionDecoder(nn.Module):
    """Queries -> (mask logits (B, Q, H/4, W/4), in-vocabulary class logits (B, Q, K + 1), void last).

    Args:
        dim: hidden channels (= pixel decoder channels); mask_dim: channels of the mask features.
        num_queries, num_layers, heads, ffn_dim: decoder sizes.
        embed_dim: CLIP's joint embedding size (the class head's output).
        levels: pixel-decoder levels cycled through by cross-attention.
    """

    def __init__(self, dim: int = 256, mask_dim: int = 256, num_queries: int = 250, num_layers: int = 9,
                 heads: int = 8, ffn_dim: int = 2048, embed_dim: int = 768, levels: int = 3) -> None:
        super().__init__()
        self.heads, self.levels = heads, levels
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn_dim) for _ in range(num_layers))
        self.out_norm = nn.LayerNorm(dim)
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_pos = nn.Embedding(num_queries, dim)
        self.level_embed = nn.Embedding(levels, dim)
        self.mask_embed = MLP(dim, dim, mask_dim, 3)
        self.pool_proj = nn.Sequential(nn.LayerNorm(mask_dim), nn.Linear(mask_dim, dim))
        self.class_embed = MLP(dim, dim, embed_dim, 3)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def _masks(self, q: torch.Tensor, mask_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised queries (B, Q, C), mask logits (B, Q, H, W))."""
        normed = self.out_norm(q)
        return normed, torch.einsum("bqc,bchw->bqhw", self.mask_embed(normed), mask_features)

    def _attn_mask(self, masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B * heads, Q, h * w) bool, True = may not attend; queries with nothing visible see everything."""
        small = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        blocked = small.sigmoid().flatten(2) < 0.5
        blocked = blocked & ~blocked.all(-1, keepdim=True)
        return blocked.repeat_interleave(self.heads, dim=0)

    def forward(
        self,
        mask_features: torch.Tensor,
        levels: Sequence[torch.Tensor],
        text: torch.Tensor,
        owner: torch.Tensor,
        num_classes: int,
        void: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mask_features (B, C, H, W); levels: ``self.levels`` maps coarse to fine; text (T, D) normalised
        with ``owner`` (T,) class ids < ``num_classes``; void (1, D) the raw void embedding."""
        masks, emb = self.decode(mask_features, levels)
        return masks, self.classify(emb, text, owner, num_classes, void)

    def decode(self, mask_features: torch.Tensor, levels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The vocabulary-independent part: (mask logits (B, Q, H, W), class embeddings (B, Q, D) in CLIP's
        text space)."""
        b = mask_features.shape[0]
        memory, memory_pos, sizes = [], [], []
        for i, x in enumerate(levels):
            h, w = x.shape[-2:]
            sizes.append((h, w))
            pe = sine_position_embedding(h, w, x.shape[1] // 2, x.device)
            memory_pos.append(pe.flatten(2).transpose(1, 2).expand(b, -1, -1))
            memory.append(x.flatten(2).transpose(1, 2) + self.level_embed.weight[i][None, None, :])
        q = self.query_feat.weight[None].expand(b, -1, -1)
        query_pos = self.query_pos.weight[None].expand(b, -1, -1)
        _, masks = self._masks(q, mask_features)
        for i, layer in enumerate(self.layers):
            lvl = i % self.levels
            q = layer(q, query_pos, memory[lvl], memory_pos[lvl], self._attn_mask(masks, sizes[lvl]))
            normed, masks = self._masks(q, mask_features)
        # Class head on the last layer only: the intermediate ones feed training losses.
        pooled = self.pool_proj(mask_pool(mask_features, masks))
        return masks, self.class_embed(pooled + normed)

    def classify(self, emb: torch.Tensor, text: torch.Tensor, owner: torch.Tensor, num_classes: int,
                 void: torch.Tensor) -> torch.Tensor:
        """In-vocabulary logits (B, Q, K + 1), void last, of the class embeddings against the text."""
        logits = text_logits(emb, text, owner, num_classes, self.logit_scale)
        scale = self.logit_scale.exp().clamp(max=100)
        void_logit = scale * F.normalize(emb, dim=-1) @ F.normalize(void, dim=-1).T
        return torch.cat([logits, void_logit], dim=-1)
