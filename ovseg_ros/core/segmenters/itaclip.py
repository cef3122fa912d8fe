"""ITACLIP: training-free semantic segmentation with image, text and architectural enhancements.

Aydın et al., "ITACLIP: Boosting Training-Free Semantic Segmentation with
Image, Text, and Architectural Enhancements", CVPR Workshops 2025 (arXiv 2411.12044); authors' code
https://github.com/m-arda-aydn/ITACLIP (checked against commit 521a33c, 2026-02-01). Our own port on
open_clip; no code of the authors is used.

What it does, per frame:

1. **Architecture.** Blocks 1..L-1 of the ViT run unchanged. The last block is replaced by *self-self*
   attention ``A = softmax(q qᵀ/√d) + softmax(k kᵀ/√d)`` (per head, CLS included; rows sum to 2, never
   renormalised), fused 50/50 with the mean of the same maps computed from the *inputs and weights* of
   intermediate blocks (7, 8, 10 of 12; for other depths the same relative positions). The fused map
   weights the last block's values, then ``out_proj``; the residual is kept, ``ln_2`` and the FFN are
   dropped. All tokens go through ``ln_post`` and ``proj`` and are L2-normalised.
2. **Image engineering** (per crop, on the normalised tensor): the *feature group* (original, grayscale,
   Gaussian blur 11/σ5 with reflect padding) is averaged at feature level; the *logit group* (vertical
   and horizontal flips) is flipped back and averaged; the two are mixed with α (``img_eng_coefficient``).
   All passes of all crops of a batch go through the ViT as one batch.
3. **Text.** Each name is encoded under the 80 ImageNet templates (mean of normalised prompts,
   renormalised). A class's auxiliary text (definition or synonym) is encoded the same way and mixed in
   with β: ``q = (1-β) t(name) + β a(class)``, not renormalised. Background words are scored like names
   and label their pixels UNLABELED. A class's probability is the max over its names.
4. **Inference.** Sliding windows (mmseg grid), bilinear upsampling to the input size, PAMR, softmax with
   the logit scale over all names, max over names, ``area_thd`` suppression, ``prob_thd``, and a 3x3
   grey-scale closing of the label ids.

Deliberate differences from the authors' code (none changes the mathematics unless stated):

* open_clip ViT (``ViT-B-16-quickgelu``/``openai`` = the same OpenAI weights) instead of a vendored CLIP;
  any open_clip ViT works (LayerScale applied where a model has it).
* The fused attention is never materialised: ``A*·V`` is computed as a weighted sum of
  ``softmax(x xᵀ/√d)·V`` terms with ``scaled_dot_product_attention`` (flash/memory-efficient kernels),
  so memory is O(N) instead of O(N²) per map; intermediate maps are weighted by ``attn_fusion / n``.
  :func:`self_self_attention` gives the explicit maps (tests check both agree).
* Flip-back and the feature/logit averaging are done on the token grid before the product with the text
  and a single bilinear upsampling per crop. Bilinear resizing is linear and flip-equivariant, so this
  equals the authors' upsample-then-flip order (checked by a test) at a fraction of the cost.
* Positional embeddings are resized bicubically to the exact token grid (``size=``) and cached per grid;
  the authors use ``scale_factor`` with a +0.1 offset. Identical for 224 crops (no resizing), slightly
  different only for other grids (whole-frame mode, images smaller than a crop).
* The resize to the processing size runs on the device on the float image (authors: mmseg/cv2 on uint8);
  ``resize: cv2`` (the dataset presets) does it as the authors.
* The Gaussian blur is two separable 1-D convolutions with torchvision's kernel (same result).
* Logits, PAMR and post-processing run in float32 even when the ViT runs in fp16 (authors: fp16 on GPU).
* Background: the authors' class 0 is our group of background words; their pixels become UNLABELED.
  Background words equal to a vocabulary name are dropped (``drop_background_in_vocabulary``, off in
  the dataset presets for parity). With no background words, ``area_thd`` treats every class as
  foreground (the authors always exclude index 0). Ties go to the class, not to the background.
* A class without auxiliary text keeps its plain name embedding (the authors require one per class).
  Auxiliary texts come from the request's description, our own definition/synonym files
  (``data/itaclip``), the request's first synonym (synonym mode), or an optional LLM endpoint — not from
  the authors' Llama-3 files.
* The closing runs on the device (same result as ``cv2.MORPH_CLOSE``) and the confidence is read at the
  closed label. ``width_chunk_size`` (memory only) is ``chunk_rows``.
* Additions for robots: whole-frame mode (``slide_crop: 0``), a subset of augmentations,
  ``refine_at: processing`` (PAMR and softmax at the ViT's input size, class probabilities upsampled), and
  with it ``fast_upsample``: rows are refined a few at a time and folded into per-class maxima, each
  pixel's two best classes and an online softmax denominator, so only candidate classes are ever turned into
  probabilities and upsampled (labels equal up to ties), and ``prune_names``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import yaml

from .. import clip_vit
from ..geometry import (
    bilinear_at,
    image_to_tensor,
    normalize,
    resize,
    short_side_size,
    slide_inference,
    sliding_windows,
    upsample_max,
    upsample_max_candidates,
)
from ..llm_text import LLMConfig, LLMTextClient
from ..models import ClipModel, ModelSpec, load_clip, resolve_device, sync_free
from ..pamr import pamr, pamr_chunks
from ..segmenter import (
    ImageError,
    Segmenter,
    SegmentationResult,
    StageTimer,
    VocabularyState,
    check_image,
    register_segmenter,
    to_host,
)
from ..segmenter import POSITIVE, SIDE, UNIT, OneOf, PlainName, Range, declare_constraints
from ..text import (
    DEFAULT_TEXT_CACHE_MB, PHOTO_TEMPLATE, TextEncoder, count_tokens, format_prompts, imagenet_templates,
    text_cache_bytes,
)
from ..vocabulary import UNLABELED, Vocabulary, background_without_classes, load_vocabulary_file, name_key

if TYPE_CHECKING:
    from ..deploy import ImageGraph

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
AUX_DIR = DATA_DIR / "itaclip"
DATASET_DIR = DATA_DIR / "datasets"

#: The authors' intermediate blocks (1-based) for a 12-block ViT.
REFERENCE_LAYERS = (7, 8, 10)
_FEATURE_AUGS = ("grayscale", "blur")
_FLIP_AUGS = ("vertical", "horizontal")
#: With ``fast_upsample``, vocabularies from this size on upsample only each pixel's candidate classes; smaller
#: ones upsample every class (as cheap, and no ranking to keep).
FAST_MIN_CLASSES = 16
#: torchvision's rgb_to_grayscale weights.
_GRAY = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class ITACLIPConfig:
    """Options of ITACLIP. Defaults are the authors' class defaults; presets hold their per-dataset values.

    Parameter names follow the authors' where they exist (``slide_stride``, ``logit_scale``, ``prob_thd``,
    ``area_thd``, ``pamr_steps``, ``def_coefficient`` = β, ``img_eng_coefficient`` = α).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    #: Class list of the preset (``data/datasets/<dataset>.yaml``), used by offline tools when no
    #: vocabulary is given; the node's vocabulary comes from its service.
    dataset: str = ""

    # --- input geometry -----------------------------------------------------------------------------
    #: Resize so the short side has this many pixels (0 keeps the input size); long side capped below.
    short_side: int = 336
    max_long_side: int = 2048
    #: Input resize: ``cv2`` = the authors' mmseg ``Resize(keep_ratio)`` (size ``int(x·s + 0.5)``, OpenCV
    #: bilinear on the uint8 image); ``torch`` = bilinear on the float image on the device.
    resize: str = "torch"
    #: Sliding-window crop (0 = the whole resized frame in one pass, positions interpolated).
    slide_crop: int = 224
    slide_stride: int = 112
    #: Windows per ViT batch (each window contributes one pass per augmentation).
    batch_windows: int = 4

    # --- architecture -------------------------------------------------------------------------------
    #: Self-self attention (softmax(qqᵀ)+softmax(kkᵀ)) in the modified layers; False = ordinary q-k attention.
    attn_self: bool = True
    #: 1-based intermediate blocks whose attention is fused; () = (7, 8, 10) scaled to the model's depth.
    intermediate_layers: tuple[int, ...] = ()
    #: Weight of the intermediate maps' mean in the fused map (the last block gets 1 - this).
    attn_fusion: float = 0.5

    # --- image engineering --------------------------------------------------------------------------
    img_engineering: bool = False
    feature_augs: tuple[str, ...] = _FEATURE_AUGS
    flip_augs: tuple[str, ...] = _FLIP_AUGS
    #: α: weight of the feature group against the flip group.
    img_eng_coefficient: float = 0.75
    blur_kernel: int = 11
    blur_sigma: float = 5.0

    # --- text ---------------------------------------------------------------------------------------
    #: ``imagenet80`` (the 80 OpenAI templates) or ``photo`` (one template).
    templates: str = "imagenet80"
    #: Words scored like class names whose pixels stay UNLABELED.
    background_words: tuple[str, ...] = ()
    #: Skip background words that equal a vocabulary name (a class must not compete with itself).
    drop_background_in_vocabulary: bool = True
    #: ``definition``, ``synonym`` or ``none`` (no auxiliary text at all).
    aux_kind: str = "definition"
    #: Auxiliary text file under ``data/itaclip`` ("" = none): ``definitions.yaml`` or ``synonyms.yaml``.
    aux_file: str = ""
    #: β: weight of the auxiliary text embedding.
    def_coefficient: float = 0.2
    #: Optional OpenAI-compatible chat endpoint asked for missing auxiliary texts.
    llm: LLMConfig = field(default_factory=LLMConfig)

    # --- post-processing ----------------------------------------------------------------------------
    logit_scale: float = 40.0
    pamr_steps: int = 0
    pamr_dilations: tuple[int, ...] = (8, 16)
    #: Where PAMR and the softmax run: ``input`` (the authors') or ``processing`` (the ViT's input size;
    #: class probabilities are then upsampled, much cheaper for large frames).
    refine_at: str = "input"
    prob_thd: float = 0.0
    #: Classes covering at most this fraction of the foreground are suppressed (0 = off).
    area_thd: float = 0.0
    #: Odd kernel of the final label closing (1 = off).
    close_kernel: int = 3
    #: Rows per chunk of the softmax/max-over-names step (0 = all at once; memory only).
    chunk_rows: int = 0
    #: With ``refine_at: processing`` and no area suppression: refine the rows a few at a time and keep only
    #: per-class maxima, each pixel's two best classes and one softmax denominator (no (rows x pixels) softmax,
    #: no scatter over names), then upsample only each pixel's candidate classes (:func:`upsample_max_candidates`).
    #: Labels equal the exact path's up to ties, confidences up to rounding.
    fast_upsample: bool = False
    #: With one whole-frame pass (``slide_crop: 0``): keep only the text rows among the top ``prune_names``
    #: of some patch (plus one row standing for the others in the softmax) before logits are upsampled and
    #: refined, so PAMR's cost stops growing with the vocabulary (0 = off, every row refined).
    prune_names: int = 0
    #: With ``prune_names``: refine at most this many rows, those that win the most patches, then those in the
    #: most patches' top ``prune_names`` (ties: the higher best logit); the others join the folded row (0 = no
    #: cap). The union of every patch's
    #: top rows still grows with the vocabulary (more rows compete for each patch's top places); the cap is
    #: what makes PAMR's cost, and the class maps after it, independent of the vocabulary size.
    prune_rows: int = 0
    #: ``torch.compile`` the ViT's unmodified blocks (:func:`clip_vit.compile_blocks`); results equal up to
    #: float rounding, the first frame of each input size compiles.
    compile_blocks: bool = False

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"itaclip: {msg}")

        if self.short_side < 0 or self.max_long_side < 0:
            bad("short_side and max_long_side must be >= 0")
        if self.resize not in ("torch", "cv2"):
            bad(f"resize must be 'torch' or 'cv2', got {self.resize!r}")
        if self.slide_crop < 0 or self.slide_stride <= 0 or self.batch_windows <= 0:
            bad("slide_crop must be >= 0, slide_stride and batch_windows > 0")
        if any(not isinstance(i, int) or i < 1 for i in self.intermediate_layers):
            bad(f"intermediate_layers are 1-based block numbers, got {self.intermediate_layers}")
        for name, value in (("attn_fusion", self.attn_fusion), ("img_eng_coefficient", self.img_eng_coefficient),
                            ("def_coefficient", self.def_coefficient), ("prob_thd", self.prob_thd),
                            ("area_thd", self.area_thd)):
            if not 0.0 <= float(value) <= 1.0:
                bad(f"{name} must be in [0, 1], got {value}")
        if set(self.feature_augs) - set(_FEATURE_AUGS) or set(self.flip_augs) - set(_FLIP_AUGS):
            bad(f"feature_augs must be from {_FEATURE_AUGS} and flip_augs from {_FLIP_AUGS}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0 or self.blur_sigma <= 0:
            bad("blur_kernel must be odd and positive, blur_sigma positive")
        if self.templates not in ("imagenet80", "photo"):
            bad(f"templates must be 'imagenet80' or 'photo', got {self.templates!r}")
        if self.aux_kind not in ("definition", "synonym", "none"):
            bad(f"aux_kind must be 'definition', 'synonym' or 'none', got {self.aux_kind!r}")
        if self.aux_file and not (AUX_DIR / self.aux_file).is_file():
            bad(f"aux_file {self.aux_file!r} not found in {AUX_DIR}")
        if self.dataset and not (DATASET_DIR / f"{self.dataset}.yaml").is_file():
            bad(f"dataset {self.dataset!r} has no class list in {DATASET_DIR}")
        if self.logit_scale <= 0 or self.pamr_steps < 0 or any(d < 1 for d in self.pamr_dilations):
            bad("logit_scale must be > 0, pamr_steps >= 0, pamr_dilations >= 1")
        if self.refine_at not in ("input", "processing"):
            bad(f"refine_at must be 'input' or 'processing', got {self.refine_at!r}")
        if self.close_kernel < 1 or self.close_kernel % 2 == 0 or self.chunk_rows < 0:
            bad("close_kernel must be odd and >= 1; chunk_rows >= 0")

    @property
    def augmentations(self) -> tuple[str, ...]:
        """The ViT passes per crop, in batch order: original, feature group, flip group."""
        if not self.img_engineering:
            return ("original",)
        return ("original",) + tuple(self.feature_augs) + tuple(self.flip_augs)


declare_constraints(
    ITACLIPConfig,
    short_side=SIDE, max_long_side=SIDE, slide_crop=SIDE, slide_stride=Range(1, 16384), batch_windows=Range(1, 4096),
    intermediate_layers=Range(1, 1000), attn_fusion=UNIT, feature_augs=OneOf(_FEATURE_AUGS),
    flip_augs=OneOf(_FLIP_AUGS), img_eng_coefficient=UNIT, blur_kernel=Range(1, 1001, odd=True),
    blur_sigma=Range(0, 1000, lo_open=True), templates=OneOf(("imagenet80", "photo")),
    aux_kind=OneOf(("definition", "synonym", "none")), def_coefficient=UNIT, logit_scale=POSITIVE,
    pamr_steps=Range(0, 100), pamr_dilations=Range(1, 1000), refine_at=OneOf(("input", "processing")),
    prob_thd=UNIT, area_thd=UNIT, close_kernel=Range(1, 1001, odd=True), chunk_rows=Range(0, 1 << 31),
    aux_file=PlainName(), dataset=PlainName(),
)


@dataclass(frozen=True, eq=False)
class ITACLIPState(VocabularyState):
    """Text side of ITACLIP for one vocabulary (tensors on the segmenter's device)."""

    #: (Q, E) query embeddings: every name of every class (aux-fused), then the background words.
    text: torch.Tensor = None  # type: ignore[assignment]
    #: (Q,) class index of each row; background rows have index ``len(vocabulary)``.
    owner: torch.Tensor = None  # type: ignore[assignment]
    num_background: int = 0
    background_words: tuple[str, ...] = ()
    #: Auxiliary text of each class ("" = none) and where it came from.
    aux_texts: tuple[str, ...] = ()
    aux_sources: tuple[str, ...] = ()
    #: The prompts encoded for each class (names and auxiliary text under the templates).
    prompts: tuple[tuple[str, ...], ...] = ()
    #: ``owner`` as host integers: the per-frame row loop reads them without a device-to-host copy.
    owner_rows: tuple[int, ...] = ()


# --- pure functions (tested directly) ---------------------------------------------------------------
def default_intermediate_layers(depth: int) -> tuple[int, ...]:
    """The authors' blocks (7, 8, 10 of 12, 1-based) at the same relative depth of a ``depth``-block ViT."""
    if depth < 2:
        return ()
    picked = {min(max(int(math.floor(b * depth / 12 + 0.5)), 1), depth - 1) for b in REFERENCE_LAYERS}
    return tuple(sorted(picked))


def self_self_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Explicit self-self attention maps (B, heads, N, N): softmax(q qᵀ/√d) + softmax(k kᵀ/√d)."""
    return clip_vit.attention_probs(q, q) + clip_vit.attention_probs(k, k)


def _attend(query: torch.Tensor, key: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(query keyᵀ/√d) v without materialising the map (fused kernels on GPU and CPU)."""
    return F.scaled_dot_product_attention(query, key, v)


def fused_attention_values(
    q_k_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    v: torch.Tensor,
    attn_self: bool = True,
    fusion: float = 0.5,
) -> torch.Tensor:
    """``A*·v`` per head, (B, heads, N, d): A* = (1-fusion)·A_last + fusion·mean(A_intermediate).

    ``q_k_pairs`` holds (q, k) of the last block first, then of each intermediate block (each computed
    from that block's own input and weights). Each A is self-self attention (rows sum to 2) when
    ``attn_self``, else ordinary softmax(q kᵀ/√d).
    """

    def apply(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if attn_self:
            return _attend(q, q, v) + _attend(k, k, v)
        return _attend(q, k, v)

    (q_last, k_last), inter = q_k_pairs[0], q_k_pairs[1:]
    out = apply(q_last, k_last)
    if not inter:
        return out
    acc = sum(apply(q, k) for q, k in inter)
    return (1.0 - fusion) * out + (fusion / len(inter)) * acc


def gaussian_kernel1d(size: int, sigma: float) -> torch.Tensor:
    """torchvision's 1-D Gaussian kernel (samples at integer offsets, normalised to sum 1)."""
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, steps=size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).float()


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H, W): torchvision's luma weights, the one channel repeated."""
    r, g, b = x.unbind(dim=1)
    y = _GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b
    return y.unsqueeze(1).expand(-1, 3, -1, -1)


def gaussian_blur(x: torch.Tensor, kernel1d: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (replicate for images too small to reflect)."""
    c = x.shape[1]
    r = kernel1d.numel() // 2
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    xp = F.pad(x, (r, r, r, r), mode=mode)
    kw = kernel1d.to(x.dtype).view(1, 1, 1, -1).expand(c, 1, 1, -1)
    kh = kernel1d.to(x.dtype).view(1, 1, -1, 1).expand(c, 1, -1, 1)
    return F.conv2d(F.conv2d(xp, kw, groups=c), kh, groups=c)


def combine_augmented(
    feats: torch.Tensor, augmentations: Sequence[str], alpha: float
) -> torch.Tensor:
    """Merge per-augmentation patch features (A*B, h, w, E) into (B, h, w, E).

    Feature group (original, grayscale, blur) averaged; flip group flipped back on the token grid and
    averaged; the two mixed as ``alpha * features + (1 - alpha) * flips`` (features alone when no flips).
    """
    n = len(augmentations)
    f = feats.reshape(n, feats.shape[0] // n, *feats.shape[1:])
    group = [f[i] for i, a in enumerate(augmentations) if a in ("original",) + _FEATURE_AUGS]
    flips = [f[i].flip(1) if a == "vertical" else f[i].flip(2)
             for i, a in enumerate(augmentations) if a in _FLIP_AUGS]
    mixed = torch.stack(group).mean(0)
    if flips:
        mixed = alpha * mixed + (1.0 - alpha) * torch.stack(flips).mean(0)
    return mixed


def close_labels_torch(labels: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """Grey-scale closing of an (H, W) int label map on its device (UNLABELED lowest), like cv2's."""
    if kernel <= 1:
        return labels
    x = (labels.float() + 1.0)[None, None]
    pad = kernel // 2
    dilated = F.max_pool2d(x, kernel, stride=1, padding=pad)  # -inf padding: the border is ignored
    closed = -F.max_pool2d(-dilated, kernel, stride=1, padding=pad)
    return closed[0, 0].to(labels.dtype) - 1


@dataclass(frozen=True)
class RowReduction:
    """What the labels need from the refined rows at the processing size (see ``_reduce_rows``)."""

    #: (M, h, w) per class the max of its names' logits, for the M classes that kept a row (all K when
    #: ``classes`` is None); a class whose rows were all pruned has probability ~0 and no map.
    cls: torch.Tensor
    #: (h, w) max over the background words' logits, or None without background words.
    bg: Optional[torch.Tensor]
    #: (h, w) log of the softmax denominator over every row, in units of ``scale * logit``.
    lse: torch.Tensor
    scale: float
    #: ((3, h, w) the three best class logits, (2, h, w) the two best classes) per pixel, or None below
    #: :data:`FAST_MIN_CLASSES` classes.
    ranking: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    #: (M,) the class id of each map of ``cls`` (None: all K classes, in order).
    classes: Optional[torch.Tensor] = None


class _Ranking:
    """Each pixel's two best classes and their scores, kept up to date in place as class maps arrive one by one
    (a k-wide sort or max-with-indices over the stacked maps costs several times more on the CPU)."""

    def __init__(self, size: tuple[int, ...], device: torch.device) -> None:
        self.values = [torch.full(size, float("-inf"), device=device) for _ in range(2)]
        self.classes = [torch.zeros(size, dtype=torch.long, device=device) for _ in range(2)]
        self._first = torch.empty(size, dtype=torch.bool, device=device)
        self._second = torch.empty(size, dtype=torch.bool, device=device)

    def add(self, x: torch.Tensor, c: int) -> None:
        (v0, v1), (i0, i1) = self.values, self.classes
        torch.gt(x, v0, out=self._first)
        torch.gt(x, v1, out=self._second)
        torch.where(self._first, v0, torch.maximum(v1, x), out=v1)  # the old best drops to second
        torch.where(self._first, i0, i1.masked_fill_(self._second, c), out=i1)
        torch.maximum(v0, x, out=v0)
        i0.masked_fill_(self._first, c)

    def finish(self, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, h, w) the three best scores (the third bounds every other class), (2, h, w) the two best classes.
        ``cls`` (k, h, w) is left unchanged."""
        at = torch.stack(self.classes)
        cls.scatter_(0, at, float("-inf"))  # hide the two best, take the max of the rest, put them back
        third = cls.amax(dim=0)
        cls.scatter_(0, at, torch.stack(self.values))
        return torch.stack([*self.values, third]), at


def area_suppression(probs: torch.Tensor, num_classes: int, area_thd: float) -> torch.Tensor:
    """Zero the class rows (first ``num_classes`` of (K [+1], H, W)) whose argmax area is at most
    ``area_thd`` times the total foreground (class-won) area. Background rows are kept."""
    if area_thd <= 0:
        return probs
    win = probs.argmax(dim=0).flatten()
    area = torch.bincount(win, minlength=probs.shape[0])[:num_classes].to(probs.dtype)
    keep = (area > area_thd * area.sum()).to(probs.dtype)
    out = probs.clone()
    out[:num_classes] *= keep.view(-1, 1, 1)
    return out


@lru_cache(maxsize=16)
def load_aux_file(file_name: str) -> dict[str, str]:
    """An auxiliary text file of ``data/itaclip`` as {normalised name: text}."""
    data = yaml.safe_load((AUX_DIR / file_name).read_text()) or {}
    return {name_key(str(k)): str(v).strip() for k, v in data.items()}


def load_dataset_vocabulary(dataset: str) -> Vocabulary:
    """The class list ``data/datasets/<dataset>.yaml`` (voc20, context59, coco_object, coco_stuff, cityscapes)."""
    return load_vocabulary_file(DATASET_DIR / f"{dataset}.yaml")


class _ITATokens(torch.nn.Module):
    """The exported graph: normalised images (B, 3, H, W) -> ITACLIP tokens (B, 1 + h*w, E)."""

    def __init__(self, segmenter: "ITACLIPSegmenter") -> None:
        super().__init__()
        self.visual = segmenter.clip.visual  # registers the weights
        self._forward = segmenter.dense_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._forward(images)[0]


# --- the segmenter ----------------------------------------------------------------------------------
@register_segmenter("itaclip")
class ITACLIPSegmenter(Segmenter):
    """ITACLIP on an open_clip ViT. See the module docstring."""

    config_cls = ITACLIPConfig
    threshold_field = "prob_thd"

    def __init__(
        self,
        config: ITACLIPConfig,
        clip: ClipModel,
        text_encoder: TextEncoder,
        llm: Optional[LLMTextClient] = None,
    ) -> None:
        super().__init__(config, clip.device)
        self.config: ITACLIPConfig = config
        self.clip = clip
        self.text_encoder = text_encoder
        self.llm = llm
        if config.compile_blocks:
            clip_vit.compile_blocks(clip.visual)
        depth = clip_vit.num_blocks(clip.visual)
        layers = config.intermediate_layers or default_intermediate_layers(depth)
        if any(b >= depth for b in layers):
            raise ValueError(f"itaclip: intermediate_layers {layers} must be below the last block ({depth})")
        if tuple(layers) != REFERENCE_LAYERS and not config.intermediate_layers:
            log.info("itaclip: %d-block ViT, fusing intermediate blocks %s (7, 8, 10 of 12 scaled)", depth, layers)
        self.intermediate = tuple(b - 1 for b in layers)  # 0-based
        self._kernel_cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_config(
        cls,
        config: ITACLIPConfig,
        device: str | torch.device = "cpu",
        cache_dir: str = "",
        offline: bool = True,
        text_cache_mb: float = DEFAULT_TEXT_CACHE_MB,
    ) -> "ITACLIPSegmenter":
        dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
        clip = load_clip(config.model, dev, cache_dir=cache_dir or None, offline=offline)
        if not hasattr(clip.visual, "transformer") or not hasattr(clip.visual, "conv1"):
            raise ValueError(f"itaclip needs an open_clip ViT; '{config.model.name}' is not one")
        llm = LLMTextClient(config.llm, cache_dir) if config.llm.enabled else None
        return cls(config, clip, TextEncoder(clip, cache_dir, max_memory_bytes=text_cache_bytes(text_cache_mb)), llm)

    def preset_vocabulary(self) -> Optional[Vocabulary]:
        """The preset's dataset class list (for offline tools when no vocabulary is given), or None."""
        return load_dataset_vocabulary(self.config.dataset) if self.config.dataset else None

    # --- text ---------------------------------------------------------------------------------------
    def _templates(self) -> tuple[str, ...]:
        return imagenet_templates() if self.config.templates == "imagenet80" else (PHOTO_TEMPLATE,)

    def _fits(self, text: str, templates: Sequence[str]) -> bool:
        limit = self.clip.context_length
        return all(count_tokens(self.clip.tokenizer, p) <= limit for p in format_prompts(text, templates))

    def _fit(self, text: str, templates: Sequence[str]) -> str:
        """The longest word prefix of a (non-user) text whose templated prompts all fit the context.

        Token counts grow with the prefix, so a binary search needs O(log n) tokenisations, not O(n).
        """
        words = text.split()
        if self._fits(" ".join(words), templates):
            return " ".join(words)
        lo, hi = 0, len(words) - 1  # words[:lo] fits (the empty prefix trivially); words[:hi + 1] does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._fits(" ".join(words[:mid]), templates):
                lo = mid
            else:
                hi = mid - 1
        return " ".join(words[:lo])

    def _aux_text(self, cls_spec, templates: Sequence[str]) -> tuple[str, str]:
        """(auxiliary text, source) of one class; ("", "none") when there is none."""
        cfg = self.config
        if cfg.aux_kind == "none" or cfg.def_coefficient == 0:
            return "", "none"
        if cls_spec.description:
            return cls_spec.description, "request"  # the user's text: too long is their error
        if cfg.aux_file:
            table = load_aux_file(cfg.aux_file)
            for name in cls_spec.names:
                if name_key(name) in table:
                    return self._fit(table[name_key(name)], templates), "file"
        if cfg.aux_kind == "synonym" and cls_spec.synonyms:
            return cls_spec.synonyms[0], "request-synonym"
        if self.llm is not None:
            answer = self.llm.get(cls_spec.name, cfg.aux_kind)
            if answer:
                answer = self._fit(answer, templates)
                if answer:
                    return answer, "llm"
        return "", "none"

    def encode_vocabulary(self, vocabulary: Vocabulary) -> ITACLIPState:
        cfg = self.config
        templates = self._templates()
        enc = self.text_encoder
        names, owner = vocabulary.query_names()
        with torch.inference_mode():
            text = enc.encode_templated(names, templates)  # (Qc, E) normalised
            aux = [self._aux_text(c, templates) for c in vocabulary.classes]
            beta = float(cfg.def_coefficient)
            owner_t = torch.tensor(owner, dtype=torch.long, device=text.device)
            aux_idx = [i for i, (t, _) in enumerate(aux) if t]
            if aux_idx:
                aux_emb = enc.encode_templated([aux[i][0] for i in aux_idx], templates)  # (A, E)
                per_class = torch.zeros(len(vocabulary), text.shape[1], device=text.device)
                has = torch.zeros(len(vocabulary), dtype=torch.bool, device=text.device)
                per_class[aux_idx] = aux_emb
                has[aux_idx] = True
                rows = has[owner_t]
                fused = (1.0 - beta) * text + beta * per_class[owner_t]  # not renormalised (authors')
                text = torch.where(rows[:, None], fused, text)
            background = (background_without_classes(cfg.background_words, vocabulary)
                          if cfg.drop_background_in_vocabulary else tuple(cfg.background_words))
            if background:
                text = torch.cat([text, enc.encode_templated(list(background), templates)])
                owner_t = torch.cat([owner_t, torch.full((len(background),), len(vocabulary), dtype=torch.long,
                                                         device=text.device)])
        prompts = tuple(
            tuple(p for n in c.names for p in format_prompts(n, templates))
            + tuple(format_prompts(a[0], templates) if a[0] else ())
            for c, a in zip(vocabulary.classes, aux)
        )
        return ITACLIPState(
            vocabulary=vocabulary,
            text=text.to(self.device).contiguous(),
            owner=owner_t.to(self.device),
            owner_rows=tuple(int(o) for o in owner) + (len(vocabulary),) * len(background),
            num_background=len(background),
            background_words=background,
            aux_texts=tuple(a[0] for a in aux),
            aux_sources=tuple(a[1] for a in aux),
            prompts=prompts,
        )

    def describe_prompts(self, state: VocabularyState) -> list[list[str]]:
        """Per class, the prompts encoded: every name under the templates, then its auxiliary text's."""
        prompts = getattr(state, "prompts", ())
        return [list(p) for p in prompts] if prompts else super().describe_prompts(state)

    # --- image: the ViT -----------------------------------------------------------------------------
    def dense_features(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """ITACLIP token features (B, 1 + h*w, E), L2-normalised, CLS first, in the model's dtype."""
        visual = self.clip.visual
        res = clip_vit.blocks(visual)
        x, grid = clip_vit.embed(visual, images)
        x, saved = clip_vit.run_blocks(visual, x, 0, len(res) - 1, capture=self.intermediate)
        last = res[-1]
        q, k, v = clip_vit.qkv(last, x)
        pairs = [(q, k)] + [clip_vit.qkv(res[i], saved[i])[:2] for i in self.intermediate]
        out = fused_attention_values(pairs, v, self.config.attn_self, self.config.attn_fusion)
        b, heads, n, hd = out.shape
        out = out.transpose(1, 2).reshape(b, n, heads * hd)
        mha = last.attn
        out = F.linear(out, mha.out_proj.weight, mha.out_proj.bias)
        x = x + clip_vit.layer_scale_1(last, out)  # residual kept; ln_2 and FFN dropped
        return F.normalize(clip_vit.project_tokens(visual, x), dim=-1), grid

    def _tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """:meth:`dense_features` from the torch ViT or from its exported graph (:mod:`..deploy`)."""
        if self.image_encoder is None:
            return self.dense_features(images)
        ps = clip_vit.patch_size(self.clip.visual)  # the patch conv drops the remainder, as in the graph
        return self.image_encoder(images)[0], (images.shape[-2] // ps, images.shape[-1] // ps)

    def image_graph(self) -> "ImageGraph":
        """ITACLIP's modified ViT (images -> fused-attention token features); augmentations are batched before
        it and merged after it in torch, so one graph serves every preset."""
        from ..deploy import ImageGraph

        cfg = self.config

        def input_size(h: int, w: int) -> tuple[int, int]:
            return (cfg.slide_crop, cfg.slide_crop) if cfg.slide_crop > 0 else self.processing_size(h, w)

        options = {"attn_self": cfg.attn_self, "attn_fusion": float(cfg.attn_fusion),
                   "intermediate": list(self.intermediate)}
        # One call: every augmentation of up to batch_windows crops (of the whole frame without windows).
        passes = len(cfg.augmentations) * (cfg.batch_windows if cfg.slide_crop > 0 else 1)
        return ImageGraph(_ITATokens(self), ("tokens",), options, input_size, clip_vit.patch_size(self.clip.visual),
                          batch=passes)

    def _blur_kernel(self, device: torch.device) -> torch.Tensor:
        key = (device, self.config.blur_kernel, self.config.blur_sigma)
        k = self._kernel_cache.get(key)
        if k is None:
            k = gaussian_kernel1d(self.config.blur_kernel, self.config.blur_sigma).to(device)
            self._kernel_cache[key] = k
        return k

    def augment(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) normalised crops -> (A*B, 3, h, w), one block of B per augmentation."""
        out = []
        for aug in self.config.augmentations:
            if aug == "original":
                out.append(crops)
            elif aug == "grayscale":
                out.append(grayscale(crops))
            elif aug == "blur":
                out.append(gaussian_blur(crops, self._blur_kernel(crops.device)))
            elif aug == "vertical":
                out.append(crops.flip(-2))
            else:
                out.append(crops.flip(-1))
        return torch.cat(out) if len(out) > 1 else crops

    def crop_logits(self, crops: torch.Tensor, text: torch.Tensor, upsample: bool = True) -> torch.Tensor:
        """Cosine logits (B, Q, h, w) of normalised crops at their own resolution (all passes in one batch)."""
        cfg = self.config
        feats, grid = self._tokens(self.augment(crops))
        patches = feats[:, 1:].float().reshape(feats.shape[0], grid[0], grid[1], -1)
        mixed = combine_augmented(patches, cfg.augmentations, float(cfg.img_eng_coefficient))
        logits = torch.einsum("bhwe,qe->bqhw", mixed, text)
        return resize(logits, tuple(crops.shape[-2:])) if upsample else logits

    # --- image: the frame ---------------------------------------------------------------------------
    def processing_size(self, h: int, w: int) -> tuple[int, int]:
        cfg = self.config
        if cfg.short_side <= 0:
            return h, w
        if cfg.resize == "cv2":  # mmcv ``rescale_size``: one factor, each side rounded half up
            long_cap = cfg.max_long_side if cfg.max_long_side > 0 else max(cfg.short_side, max(h, w))
            s = min(max(long_cap, cfg.short_side) / max(h, w), min(long_cap, cfg.short_side) / min(h, w))
            return int(h * s + 0.5), int(w * s + 0.5)
        return short_side_size(h, w, cfg.short_side, cfg.max_long_side)

    def vit_passes(self, h: int, w: int) -> int:
        """ViT image passes ``segment`` makes for an h x w input (windows x augmentations)."""
        ph, pw = self.processing_size(h, w)
        crop = self.config.slide_crop
        windows = len(sliding_windows(ph, pw, crop, self.config.slide_stride)) if crop > 0 else 1
        return windows * len(self.config.augmentations)

    def _prepare(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 3, h', w') normalised float32 at the processing size, on the device."""
        h, w = image.shape[:2]
        ps = clip_vit.patch_size(self.clip.visual)
        size = self.processing_size(h, w)
        if min(size) < ps:
            raise ImageError(f"the image ({w}x{h}) is smaller than one {ps}-pixel patch after resizing to {size}")
        if self.config.resize == "cv2" and tuple(image.shape[:2]) != size:
            image = cv2.resize(np.ascontiguousarray(image), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        x = resize(image_to_tensor(image, self.device), size)
        mean, std = self.clip.pixel_stats()
        return normalize(x, mean, std)

    def _logits(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        fn: Callable[[torch.Tensor], torch.Tensor] = lambda crops: self.crop_logits(crops, text)  # noqa: E731
        if cfg.slide_crop > 0:
            return slide_inference(x, fn, cfg.slide_crop, cfg.slide_stride, text.shape[0], cfg.batch_windows)
        return fn(x)

    def _pruned_logits(
        self, x: torch.Tensor, text: torch.Tensor, state: ITACLIPState, upsample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch-level logits of every row; rows never among a patch's top ``prune_names`` are folded into one
        log-sum-exp row (it keeps the softmax's denominator, owner = an extra class that is dropped later).
        Returns the kept rows (upsampled to the processing size unless ``upsample`` is False), and their
        owners."""
        low = self.crop_logits(x, text, upsample=False)[0]  # (Q, gh, gw)
        owner = state.owner.to(low.device)
        top = low.topk(min(self.config.prune_names, low.shape[0]), dim=0).indices
        kept = torch.zeros(low.shape[0], dtype=torch.bool, device=low.device)
        kept[top.flatten()] = True
        cap = self.config.prune_rows
        if 0 < cap < low.shape[0]:
            # Rows ranked by how many patches they win (the labels' candidates first), then by how many have
            # them among their top rows, then by their best logit (sigmoid: in (0, 1), below one count).
            q = low.shape[0]
            wins = torch.bincount(top[0].flatten(), minlength=q).to(torch.float64)
            counts = torch.bincount(top.flatten(), minlength=q).to(torch.float64)
            score = wins * (top.numel() + 1) + counts + torch.sigmoid(low.amax(dim=(1, 2)).double())
            rank = torch.where(kept, score, -1.0)
            kept = torch.zeros_like(kept)
            kept[rank.topk(cap).indices] = True
            kept &= counts > 0
        size = tuple(x.shape[-2:]) if upsample else tuple(low.shape[-2:])
        if int(kept.sum()) >= low.shape[0] - 1:
            return resize(low[None], size), owner
        scale = self.config.logit_scale
        rest = torch.logsumexp(scale * low[~kept], dim=0, keepdim=True) / scale
        extra = len(state.vocabulary) + (1 if state.num_background else 0)
        rows = torch.cat([low[kept], rest])
        owners = torch.cat([owner[kept], torch.tensor([extra], dtype=owner.dtype, device=owner.device)])
        return resize(rows[None], size), owners

    def _class_probs(
        self, logits: torch.Tensor, state: ITACLIPState, owner: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(Q, H, W) logits -> (K [+1 background], H, W): softmax over all names, max over each class's.

        ``owner`` replaces the state's row owners for pruned logits; rows owned by class K [+1] (the folded
        rest) only count in the softmax, and classes left without rows get probability 0."""
        k = len(state.vocabulary) + (1 if state.num_background else 0)
        pruned = owner is not None
        owner = (state.owner if owner is None else owner).to(logits.device)
        if pruned:
            p = torch.softmax(self.config.logit_scale * logits, dim=0)
            return clip_vit.max_over_names(p[None], owner, k + 1)[0, :k].clamp_(min=0)
        rows = self.config.chunk_rows or logits.shape[1]
        out = []
        for s in range(0, logits.shape[1], rows):
            p = torch.softmax(self.config.logit_scale * logits[:, s:s + rows], dim=0)
            out.append(clip_vit.max_over_names(p[None], owner, k)[0])
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]

    def _labels(self, probs: torch.Tensor, state: ITACLIPState) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        k = len(state.vocabulary)
        probs = area_suppression(probs, k, cfg.area_thd)
        conf, idx = probs[:k].max(dim=0)
        labels = idx.to(torch.int32)
        top = conf
        if state.num_background:
            bg = probs[k]
            labels = torch.where(bg > conf, torch.full_like(labels, UNLABELED), labels)
            top = torch.maximum(conf, bg)
        if cfg.prob_thd > 0:
            labels = torch.where(top < cfg.prob_thd, torch.full_like(labels, UNLABELED), labels)
        if cfg.close_kernel > 1:
            labels = close_labels_torch(labels, cfg.close_kernel)
            chosen = probs[:k].gather(0, labels.clamp(min=0).long()[None])[0]
            conf_out = torch.where(labels >= 0, chosen, top)
        else:
            conf_out = torch.where(labels >= 0, conf, top)
        labels_np, conf_np = to_host(labels, conf_out.float().clamp(0, 1))
        return labels_np, conf_np

    def _reduce_rows(
        self, guide: torch.Tensor, rows: torch.Tensor, owner: torch.Tensor, state: ITACLIPState
    ) -> RowReduction:
        """Upsample and refine (PAMR) the (1, Q, h, w) rows a few at a time and fold each chunk, while it is
        still in cache, into what the labels need: per class the max over its names, each pixel's best classes,
        the background words' max, and the softmax denominator over every row. The Q refined maps are never
        held together, and nothing after this grows with Q."""
        cfg = self.config
        k = len(state.vocabulary)
        scale = float(cfg.logit_scale)
        size = tuple(guide.shape[-2:])
        # The state's rows are known on the host; pruned rows (CPU only, see segment) are read back.
        owners = list(state.owner_rows) if owner is state.owner and state.owner_rows else owner.tolist()
        last = {o: i for i, o in enumerate(owners)}  # a class's value is final after its last row
        dev = guide.device
        inf = float("-inf")
        # Maps only for the classes that kept a row: after pruning, nothing here is sized by the vocabulary.
        present = sorted({o for o in owners if o < k}) or [0]
        slot = {c: i for i, c in enumerate(present)}
        classes = None if len(present) == k else torch.tensor(present, dtype=torch.long, device=dev)
        cls = torch.full((len(present), *size), inf, device=dev)
        bg = torch.full(size, inf, device=dev) if state.num_background else None
        ranking = _Ranking(size, dev) if len(present) >= FAST_MIN_CLASSES and not sync_free(dev) else None
        top = torch.full(size, inf, device=dev)  # running max of scale * logit (online log-sum-exp)
        acc = torch.zeros(size, device=dev)  # sum of exp(scale * logit - top)
        for start, part in pamr_chunks(guide, rows, cfg.pamr_steps, cfg.pamr_dilations,
                                       upsample=lambda m: resize(m, size)):
            part = part[0]
            scaled = scale * part
            new_top = torch.maximum(top, scaled.amax(dim=0))
            acc = acc * torch.exp(top - new_top) + torch.exp(scaled - new_top).sum(dim=0)
            top = new_top
            for i, o in enumerate(owners[start:start + part.shape[0]], start=start):
                if o < k:
                    c = cls[slot[o]]
                    torch.maximum(c, part[i - start], out=c)
                    if ranking is not None and last[o] == i:
                        ranking.add(c, slot[o])
                elif o == k and bg is not None:
                    torch.maximum(bg, part[i - start], out=bg)
        ranked = ranking.finish(cls) if ranking is not None else None
        return RowReduction(cls, bg, top + acc.log(), scale, ranked, classes)

    def _labels_fast(
        self, red: RowReduction, size: tuple[int, int], state: ITACLIPState
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_labels` of ``resize(_class_probs(logits), size)`` from the class logits at the processing
        size (see ``fast_upsample``), never a (classes x output pixels) map.

        Softmax is monotonic within a pixel, so a class's probability is ``exp(scale * best name - lse)``: the
        max over names is taken on logits and probabilities are formed only where needed: each pixel's two best
        classes and the third score, the candidates of :func:`upsample_max_candidates`, and the pixels it must
        recompute. Labels
        equal the exact path's up to ties, confidences up to rounding."""
        cfg = self.config
        cls, lse, scale = red.cls, red.lse, red.scale
        h, w = cls.shape[-2:]
        flat_cls, flat_lse = cls.flatten(), lse.flatten()

        def prob(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.exp(scale * v - lse[a, b])

        def all_probs() -> torch.Tensor:
            return torch.exp(scale * cls - lse)

        if red.ranking is None:  # a handful of classes: the full upsampling is as cheap
            conf, idx = upsample_max(all_probs(), size)
        else:
            values, classes = red.ranking
            conf, idx = upsample_max_candidates(
                torch.exp(scale * values - lse), classes, size,
                lambda c, pix: torch.exp(scale * flat_cls.take(c * (h * w) + pix) - flat_lse.take(pix)),
                lambda ys, xs: bilinear_at(cls, size, ys, xs, transform=prob),
                lambda: upsample_max(all_probs(), size),
            )
        if red.classes is not None:  # map rows of the kept classes back to class ids
            idx = red.classes[idx]
        labels = idx.to(torch.int32)
        top = conf
        if red.bg is not None:
            bg = resize(torch.exp(scale * red.bg - lse)[None, None], size)[0, 0]
            labels = torch.where(bg > conf, torch.full_like(labels, UNLABELED), labels)
            top = torch.maximum(conf, bg)
        if cfg.prob_thd > 0:
            labels = torch.where(top < cfg.prob_thd, torch.full_like(labels, UNLABELED), labels)
        chosen = conf
        if cfg.close_kernel > 1:
            closed = close_labels_torch(labels, cfg.close_kernel)
            changed = (closed != labels) & (closed >= 0)
            row_of = closed.long()  # a closed label is some neighbour's label: a kept class, mapped to its map
            if red.classes is not None:
                inv = torch.zeros(len(state.vocabulary), dtype=torch.long, device=cls.device)
                inv[red.classes] = torch.arange(len(red.classes), device=cls.device)
                row_of = inv[row_of.clamp(min=0)]
            if sync_free(cls.device):  # fixed shapes: every pixel's closed-label probability, kept where changed
                ys, xs = torch.meshgrid(torch.arange(size[0], device=cls.device),
                                        torch.arange(size[1], device=cls.device), indexing="ij")
                at = bilinear_at(cls, size, ys.flatten(), xs.flatten(), row_of.flatten().clamp(min=0),
                                 transform=prob).view(size)
                chosen = torch.where(changed, at, conf)
            else:
                moved = changed.nonzero(as_tuple=True)
                chosen = conf.clone()
                if moved[0].numel():  # the closed label's own probability, only where closing changed it
                    chosen[moved] = bilinear_at(cls, size, moved[0], moved[1], row_of[moved], transform=prob)
            labels = closed
        conf_out = torch.where(labels >= 0, chosen, top)
        labels_np, conf_np = to_host(labels, conf_out.float().clamp(0, 1))
        return labels_np, conf_np

    @torch.inference_mode()
    def segment(self, image: np.ndarray, state: Optional[VocabularyState] = None) -> SegmentationResult:
        st: ITACLIPState = self._resolve_state(state)  # type: ignore[assignment]
        if not isinstance(st, ITACLIPState):
            raise TypeError(f"itaclip: expected an ITACLIPState, got {type(st).__name__}")
        image = check_image(image)
        cfg = self.config
        timer = StageTimer(self.device)
        h, w = image.shape[:2]
        with timer.stage("preprocess"):
            x = self._prepare(image)
            text = st.text.to(self.device)
        owner = None
        # Refine and classify in one stream of row chunks: labels need per-class maxima and one denominator.
        fast = cfg.refine_at == "processing" and cfg.fast_upsample and cfg.area_thd <= 0
        with timer.stage("backbone"):
            # Pruning picks rows by value (a data-dependent shape): CPU only; a GPU refines every row at once.
            if cfg.prune_names > 0 and cfg.slide_crop <= 0 and not sync_free(self.device):
                logits, owner = self._pruned_logits(x, text, st, upsample=not fast)
            elif fast and cfg.slide_crop <= 0:
                logits = self.crop_logits(x, text, upsample=False)  # patch grid; upsampled chunk by chunk
            else:
                logits = self._logits(x, text)  # (1, Q, h', w') float32
        if fast:
            with timer.stage("refine"):
                red = self._reduce_rows(x, logits, st.owner if owner is None else owner, st)
            with timer.stage("classify"):
                labels, conf = self._labels_fast(red, (h, w), st)
            return SegmentationResult(labels, conf, st.vocabulary, timings=timer.times)
        with timer.stage("refine"):
            if cfg.refine_at == "input":
                logits = resize(logits, (h, w))
                guide = resize(x, (h, w))
            else:
                guide = x
            if cfg.pamr_steps > 0:
                logits = pamr(guide, logits, cfg.pamr_steps, cfg.pamr_dilations)
        with timer.stage("classify"):
            probs = self._class_probs(logits[0], st, owner)
            if cfg.refine_at == "processing":
                probs = resize(probs[None], (h, w))[0]
            labels, conf = self._labels(probs, st)
        return SegmentationResult(labels, conf, st.vocabulary, timings=timer.times)

    @torch.inference_mode()
    def backbone_forward(self, image: np.ndarray) -> None:
        """One unmodified ViT forward of the whole frame at the processing size (benchmark baseline)."""
        clip_vit.bare_forward(self.clip.visual, self._prepare(check_image(image)))

    def to(self, device: torch.device | str) -> "ITACLIPSegmenter":
        super().to(device)
        self.clip.to(self.device)
        self._kernel_cache.clear()
        return self
