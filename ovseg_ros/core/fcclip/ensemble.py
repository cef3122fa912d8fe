"""FC-CLIP's geometric ensemble of the in-vocabulary and out-of-vocabulary class probabilities.

Yu et al., NeurIPS 2023 (arXiv 2308.02487), section 3, https://github.com/bytedance/fc-clip (``FCCLIP.forward``).
For each query and class c (void excluded from both softmaxes)::

    logit_c = (1 - a_c) * log p_in(c) + a_c * log p_out(c),   a_c = alpha if c was seen in training else beta
    p(c)    = softmax(logit)_c * (1 - p_void),                 p_void = softmax(in-vocab logits incl. void)[void]

so the trained classifier dominates on COCO classes (alpha = 0.4) and frozen CLIP on novel ones (beta = 0.8),
and the void probability of the trained head still removes queries that found nothing.
"""

from __future__ import annotations

from typing import Optional

import torch


def geometric_ensemble(
    in_logits: torch.Tensor,
    out_logits: torch.Tensor,
    seen: torch.Tensor,
    alpha: float = 0.4,
    beta: float = 0.8,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Class probabilities (..., K + 1), void last, summing to 1 per query.

    Args:
        in_logits: (..., K + 1) in-vocabulary logits, void last.
        out_logits: (..., K) out-of-vocabulary (frozen CLIP) logits.
        seen: (K,) bool, classes of the training vocabulary.
        valid: optional (...,) bool; where False (an empty mask) the out-of-vocabulary term is ignored
            (the authors' ``ENSEMBLE_ON_VALID_MASK``).
    """
    log_in = in_logits[..., :-1].float().log_softmax(-1)
    log_out = out_logits.float().log_softmax(-1)
    a = torch.where(seen.to(log_in.device), alpha, beta).to(log_in.dtype)  # (K,)
    if valid is not None:
        a = a * valid.to(log_in.dtype)[..., None]
    # In log space: the authors' (p_in^(1-a) * p_out^a).log() gives -inf (and NaN after masking) on underflow.
    logits = (1 - a) * log_in + a * log_out
    p_void = in_logits.float().softmax(-1)[..., -1:]
    return torch.cat([logits.softmax(-1) * (1 - p_void), p_void], dim=-1)
