"""CaR: CLIP as RNN, a training-free recurrent segmenter built from two frozen CLIPs.

Sun, Zhang, Zhou, Li, Zhang, Yeung, Yang and Torr (our short form: Sun et al.), "CLIP as RNN: Segment
Countless Visual Concepts without Training Endeavor", CVPR 2024 (arXiv 2312.07661). Authors' code:
https://github.com/google-research/google-research/tree/master/clip_as_rnn (``modeling/model/car.py``,
``clipcam.py``, ``clip_wrapper.py``, ``utils.py``, ``crf.py``, ``evaluate.py``, ``utils/merge_mask.py``,
``utils/inference_pipeline.py``), read at commits 4c42994 / 8d8a4f1. This is our own implementation.

The recurrence. The hidden state is the set of text queries still alive; the image is the input at every step.
One step: (1) stage 1 turns every live query into a mask proposal with CLIP-ES's softmax Grad-CAM and
class-aware attention affinity on a ViT-B/16 (shared machinery, :mod:`ovseg_ros.core.cam`), with background
words in the softmax; (2) stage 2 draws each proposal onto the image as a visual prompt (red ellipse, blur,
gray, ... :mod:`ovseg_ros.core.visual_prompts`) and a second CLIP (ViT-L/14) scores every prompted image against
the live queries with a 15-template ensemble (softmax per template, summed, softmax again); a query survives
when the score of its own prompted image exceeds θ. The loop stops when the number of survivors stops
changing; the last proposals are refined with a dense CRF (:mod:`ovseg_ros.core.crf`) and, optionally,
snapped to masks of an external source (SAM) matched by intersection over minimum.

Step bound. The live set only shrinks (the survivors, or the single best query when none survives). We also
stop when the next step's live set equals the current one, because that step would repeat the current one
exactly and then stop (the authors run it). So every step after the first has strictly fewer queries than
the one before, and a vocabulary of N queries takes at most N steps, N + 1 with ``cam_raw_names_first_step``
(step 1 and step 2 then differ in the CAM text even for the same queries). ``max_steps`` caps it further.

Modes. *Semantic* (:meth:`CarSegmenter.segment`): all queries share one CAM softmax; vocabularies with stuff
classes get, with ``mutual_background``, a second pass over the stuff classes in which the thing names are
the background words; the label map paints stuff, then things, each in ascending score, where score > 0.
*Referring* (:meth:`CarSegmenter.query`, the node's ``~/query`` and the offline tool): one CAM per sentence
(softmax over that sentence and the background words), one CRF per mask; :meth:`CarSegmenter.refer` merges
the masks of sentences that describe one object by score-weighted mean (falling back to their union).

Host waits on a GPU (``models.sync_free``). Per frame :meth:`CarSegmenter.segment` reads the device once per
loop step (the diagonal and the "any proposal" flag in one ``tolist``: who survives decides the next step's
shapes) and once per dense CRF (the lattice's size); everything else stays on the device until one copy of the
planes (the retry without background words is batched into the same backward, the labels are painted on the
device). A fixed number of device rounds over all queries with a survivor mask would need no read, but measured
2.0x (6 classes) and 3.0x (20 classes) the loop's work on the realtime preset (``benchmarks/bench_host_sync.py``,
docs/benchmarks.md "Host synchronisation per frame"), so the read per step stays, and
tests/core/test_host_sync.py allows exactly it.

The loop counts survivors as the authors' ``_forward_car`` does: when no query passes θ, ``_filter_texts``
appends the best query to the survivor list in place, so it counts as a positive and the loop goes on with
it (an empty first step does not end the loop; see :func:`run_recurrence`).

Differences from the authors' code. Each one that changes numbers has a switch restoring the authors'
behaviour, and the paper presets (voc, coco_object, pascal_context, ade, refcoco, demo) set all of them;
``docs/methods/car.md`` has the table. Switch (authors' value): ``cam_resize`` (``pil``, the default),
``cam_eps`` (1e-15, the default), ``cam_clip_box_edges`` (true), ``drop_background_overlaps`` (false),
``gray_order`` (``bgr``), ``prompt_backend`` (``authors``: OpenCV prompts and PIL classifier input),
``keep_full_image`` (false: centre crop), ``reuse_whole_stack`` (true), ``crf_image`` (``authors``),
``crf_onehot_shift`` (true). Without a switch, because the numbers do not change: open_clip models, cached
text embeddings, the CAM backbone and affinity once per image, batched classification, one "outside" image
per image. Not reproducible: their SAM path (it cannot run; ours is the ``mask_source`` hook) and pydensecrf
(ours is the shared torch CRF). Additions, off in the paper presets: ``cam_max_side``, ``prompt_max_side``,
``crf_max_side``, ``max_steps``, ``crf: false``, ``classifier_negatives``, ``keep_best_when_empty: false``.
Kept as the authors' because θ was tuned with them: ``classifier_skip_last_block`` (kevin-ssy/CLIP_as_RNN#12)
and ``cam_raw_names_first_step``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import clip_vit
from ..cam import (
    CAR_EPS,
    COCO_BACKGROUND,
    RESIZE_MODES,
    ClipCam,
    authors_crf_image,
    prepare_image,
    refine_with_affinity,
)
from ..crf import dense_crf_capped
from ..geometry import image_to_tensor, normalize
from ..models import ClipModel, ModelSpec, load_clip, sync_free, upload
from ..segmenter import (
    QueryResult,
    Segmenter,
    SegmentationResult,
    StageTimer,
    VocabularyState,
    check_image,
    register_segmenter,
    to_host,
)
from ..segmenter import POSITIVE, SIDE, UNIT, OneOf, Range, Template, declare_constraints
from ..text import (
    DEFAULT_TEXT_CACHE_MB, ORIGAMI_TEMPLATE, TextEncoder, VILD_TEMPLATES, format_prompts, text_cache_bytes,
)
from ..visual_prompts import (
    apply_visual_prompts,
    check_kinds,
    outside_appearance,
    reference_classifier_input,
    reference_prompt,
    to_classifier_input,
)
from ..vocabulary import UNLABELED, Vocabulary, background_without_classes, vocabulary_from_texts

if TYPE_CHECKING:
    from ..deploy import ImageGraph

#: The 15 classifier templates of the authors' semantic configs: CLIP-ES's origami template followed by the
#: 14 FC-CLIP/ViLD templates.
CAR_TEMPLATES: tuple[str, ...] = (ORIGAMI_TEMPLATE, *VILD_TEMPLATES)

#: The 23 background words of every CaR config: CLIP-ES's COCO list.
CAR_BACKGROUND: tuple[str, ...] = COCO_BACKGROUND


@dataclass(frozen=True)
class CarConfig:
    """Options of CaR (presets in ``presets/car``). Greek letters are the paper's."""

    #: Stage-1 CLIP (Grad-CAM + affinity); ViT only.
    cam_model: ModelSpec = field(default_factory=lambda: ModelSpec("ViT-B-16-quickgelu", "openai"))
    #: Stage-2 CLIP that scores prompted images; any open_clip model. Shared with ``cam_model`` when equal.
    classifier_model: ModelSpec = field(default_factory=lambda: ModelSpec("ViT-L-14-quickgelu", "openai"))

    # --- stage 1 ---
    #: λ: CAM threshold (fraction of the max) for the affinity's box mask (``clipes_threshold``).
    cam_threshold: float = 0.4
    #: Background words in the CAM softmax (formatted with ``cam_template``).
    background_words: tuple[str, ...] = CAR_BACKGROUND
    cam_template: str = ORIGAMI_TEMPLATE
    #: Step 1 sends the raw query text to the CAM, later steps the templated one (the authors' behaviour).
    cam_raw_names_first_step: bool = True
    drop_background_overlaps: bool = True
    #: Softmax temperature of the CAM target (pretrained CLIP's exp(logit_scale) = 100).
    cam_logit_scale: float = 100.0
    #: Long-side cap of the CAM input in pixels (0 = the input size, as the authors).
    cam_max_side: int = 0
    #: CAM input resampling: ``pil`` (the authors' PIL bicubic on uint8) or ``torch`` (torch bicubic).
    cam_resize: str = "pil"
    #: Min-max epsilon of the CAM normalisation: CaR's own ``scale_cam_image`` uses 1e-15 (CLIP-ES 1e-7).
    cam_eps: float = CAR_EPS
    #: Keep CLIP-ES's clipping of box ends to size-1 (False = the shared fix, see ``cam.box_mask``).
    cam_clip_box_edges: bool = False
    cam_max_batch: int = 8

    # --- stage 2 ---
    #: η: proposals above this become the prompt's mask (``mask_threshold``).
    mask_threshold: float = 0.5
    #: θ: a query survives when its own prompted image scores above this (``confidence_threshold``).
    confidence_threshold: float = 0.3
    visual_prompts: tuple[str, ...] = ("circle", "blur")
    #: Prompts of the stuff pass (``stuff_visual_prompt_type``).
    stuff_visual_prompts: tuple[str, ...] = ("gray", "blur")
    prompt_color: tuple[int, int, int] = (255, 0, 0)
    prompt_thickness: int = 1
    blur_kernel: int = 15
    gray_order: str = "rgb"
    #: Long-side cap at which prompts are composed (0 = full resolution, as the authors).
    prompt_max_side: int = 0
    #: Classifier templates; one template means one softmax, several the double-softmax ensemble.
    templates: tuple[str, ...] = CAR_TEMPLATES
    classifier_logit_scale: float = 100.0
    #: Classify the CLS token after L-1 blocks (the authors' wrapper does; θ was tuned with it).
    classifier_skip_last_block: bool = True
    #: Classifier input side (0 = the model's own).
    classifier_input_size: int = 0
    #: Pad prompted images to a square before resizing (fix); False = resize + centre crop (reference).
    keep_full_image: bool = True
    #: Prompted images composed per chunk (memory); the classifier still sees the whole step in one batch.
    prompt_chunk: int = 32
    #: ``torch``: our batched prompts (analytic outlines, torch resize); ``authors``: every prompt composed
    #: with OpenCV on uint8 and resized with PIL, pixel for pixel as the authors' code (slow, one at a time).
    prompt_backend: str = "torch"
    #: Add the background words to the stage-2 softmax as negatives (not in the reference): otherwise one
    #: query alone always scores 1 and can never be dropped (a single ``query`` text, a 1-class vocabulary).
    classifier_negatives: bool = False

    # --- loop ---
    #: Hard cap on steps (0 = the vocabulary bound, N + 1).
    max_steps: int = 0
    #: After a step whose proposals are all zero, keep the previous step's whole stack paired by position
    #: (the authors' code; rows then belong to other queries) instead of the live queries' own rows (fix).
    reuse_whole_stack: bool = False
    #: When no query passes θ, keep the best one and go on (the authors' loop). False: stop with nothing
    #: kept, so every query can be rejected (our addition; with ``classifier_negatives`` for single texts).
    keep_best_when_empty: bool = True

    # --- semantic mode ---
    #: Second pass for stuff classes with the thing names as background words (Context/ADE configs).
    mutual_background: bool = False
    #: Exponent of the CRF background score (1 - max cam)^f, things / stuff pass.
    bg_factor: float = 1.0
    stuff_bg_factor: float = 1.0
    #: Joins a class's names into one query.
    synonym_joiner: str = ","

    # --- refinement ---
    #: Dense CRF on the final proposals (False: argmax of the same unary, no pairwise terms).
    crf: bool = True
    #: Image the CRF's bilateral kernel sees: ``rgb`` (ours) or ``authors`` (RGB minus the mean, cast to
    #: uint8, wrapping around, as their ``PostProcess``).
    crf_image: str = "rgb"
    #: Referring mode: the authors' ``F.one_hot`` returns no mask for a text whose CRF labels everything
    #: background, so the masks of later texts move up one place. True reproduces that; False (fix) keeps
    #: one mask per text.
    crf_onehot_shift: bool = False
    #: Referring mode of ``refer`` (the RefCOCO protocol) only: the authors' ``_filter_texts`` without
    #: ``semantic_templates`` (every refcoco config) indexes each step-1 prompt *string* by the surviving ids,
    #: so from step 2 on stage 2 scores the prompted images against single characters: live text q, under
    #: "template" j (one per step-1 text), is character q of text j's prompt; softmax per template over the
    #: live texts, summed, softmax again. Harmless with one survivor, decisive with two or more, and behind
    #: their published RefCOCO numbers, so the refcoco preset sets it. ``query`` (the node's ``~/query``,
    #: ``ovseg-segment --query``) never uses it. Needs exactly one template.
    refer_char_filter: bool = False
    #: Long-side cap at which the CRF runs (0 = full resolution, as the authors); marginals are upsampled.
    crf_max_side: int = 0
    #: External masks (``mask_source``): IoM to match (``iom_thres``), per-prediction floor, IoU to accept.
    iom_threshold: float = 0.6
    min_pred_threshold: float = 0.05
    matching_threshold: float = 0.9

    # --- referring merge (refer) ---
    refer_merge_threshold: float = 0.5
    refer_min_cover: float = 0.05


declare_constraints(
    CarConfig,
    cam_threshold=UNIT, cam_logit_scale=POSITIVE, cam_max_side=SIDE, cam_max_batch=Range(1, 4096),
    mask_threshold=UNIT, confidence_threshold=UNIT, prompt_color=Range(0, 255), prompt_thickness=Range(0, 1000),
    blur_kernel=Range(1, 1001, odd=True), gray_order=OneOf(("rgb", "bgr")), prompt_max_side=SIDE,
    classifier_logit_scale=POSITIVE, classifier_input_size=SIDE, prompt_chunk=Range(1, 4096),
    max_steps=Range(0, 100_000), bg_factor=Range(0, 100), stuff_bg_factor=Range(0, 100), crf_max_side=SIDE,
    iom_threshold=UNIT, min_pred_threshold=UNIT, matching_threshold=UNIT, refer_merge_threshold=UNIT,
    refer_min_cover=UNIT, cam_template=Template(), templates=Template(),
)


# --- stage 1 protocol and its CLIP-ES implementation ----------------------------------------------------
class ProposalSource(Protocol):
    """Stage 1: per-query mask proposals (Q, H, W) float in [0, 1] at the image's resolution.

    ``prepare`` does the per-image work once (the loop calls ``propose`` every step with the live queries).
    ``separate=False``: one softmax over all queries + background (semantic); ``True``: one CAM per query with
    only that query + background in the softmax (referring). Texts arrive fully formatted.
    """

    def prepare(self, image: np.ndarray) -> Any: ...

    def propose(
        self, prepared: Any, queries: Sequence[str], background: Sequence[str], separate: bool = False
    ) -> torch.Tensor: ...


#: External mask source: (H, W, 3) uint8 RGB -> (M, H, W) bool candidate masks (e.g. SAM's automatic masks).
MaskSource = Callable[[np.ndarray], Any]


@dataclass
class _Prepared:
    encoding: Any
    affinity: torch.Tensor
    size: tuple[int, int]


class ClipEsProposals:
    """CaR's stage 1 on :mod:`ovseg_ros.core.cam`: softmax Grad-CAM + class-aware attention affinity."""

    def __init__(self, clip: ClipModel, text: TextEncoder, config: CarConfig) -> None:
        self.clip = clip
        self.text = text
        self.config = config
        self.cam = ClipCam(clip, logit_scale=config.cam_logit_scale, max_batch=config.cam_max_batch,
                           eps=config.cam_eps)
        #: ONNX Runtime stand-in for the CAM ViT pass (set through ``CarSegmenter.image_encoder``).
        self.encoder: Optional[Callable[[torch.Tensor], list[torch.Tensor]]] = None

    def warm(self, texts: Sequence[str]) -> None:
        """Encode ``texts`` into the cache now (vocabulary time), so steps only hit memory."""
        if texts:
            self.text.encode_texts(list(dict.fromkeys(texts)))

    def prepare(self, image: np.ndarray) -> _Prepared:
        x = prepare_image(self.clip, image, max_long_side=self.config.cam_max_side, resize=self.config.cam_resize)
        enc = self.cam.encode(x, encoder=self.encoder)
        return _Prepared(enc, self.cam.affinity(enc), tuple(image.shape[:2]))

    def propose(
        self, prepared: _Prepared, queries: Sequence[str], background: Sequence[str], separate: bool = False
    ) -> torch.Tensor:
        enc = prepared.encoding
        text = self.text.encode_texts(list(queries)).float()
        bg = self.text.encode_texts(list(background)).float() if background else None
        if separate:
            cams = torch.cat([self.cam.gradcam(enc, text[i:i + 1], bg, [0], retry_without_background=True)
                              for i in range(len(queries))])
        else:
            cams = self.cam.gradcam(enc, text, bg, range(len(queries)), retry_without_background=True)
        refined = refine_with_affinity(prepared.affinity, cams, self.config.cam_threshold,
                                       clip_box_edges=self.config.cam_clip_box_edges, eps=self.config.cam_eps)
        up = F.interpolate(refined[None], size=prepared.size, mode="bilinear", align_corners=False)[0]
        return up.clamp_(0, 1)


# --- stage 2 -------------------------------------------------------------------------------------------
def template_ensemble(image_features: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CaR's prompt ensemble: (N, E) normalised images x (Q, T, E) normalised texts -> (N, Q) probabilities.

    For each template t a softmax over the Q queries of ``logit_scale · cos``; the T softmaxes are summed and
    passed through a softmax again. With one template it is that template's softmax (the authors' referring
    configs).
    """
    logits = logit_scale * torch.einsum("ne,qte->tnq", image_features.float(), text.float())
    probs = logits.softmax(dim=-1)
    if text.shape[1] == 1:
        return probs[0]
    return probs.sum(dim=0).softmax(dim=-1)


class PromptClassifier:
    """Stage 2's CLIP: cached template text banks and batched image embeddings of prompted images."""

    def __init__(self, clip: ClipModel, text: TextEncoder, config: CarConfig) -> None:
        self.clip = clip
        self.text = text
        self.config = config
        native = getattr(clip.visual, "image_size", 224)
        native = native[0] if isinstance(native, (tuple, list)) else native
        self.input_size = int(config.classifier_input_size or native)
        self.is_vit = hasattr(clip.visual, "transformer") and hasattr(clip.visual, "conv1")

    def encode_queries(self, queries: Sequence[str]) -> torch.Tensor:
        """(Q, T, E): each query under every template, normalised per prompt (cached per query)."""
        templates = self.config.templates
        if not templates:
            raise ValueError("car: 'templates' is empty")
        rows = [self.text.encode_group(format_prompts(q, templates)) for q in queries]
        return torch.stack(rows).float()

    def fill(self) -> tuple[float, float, float]:
        """Padding colour in 0..255: the normalisation mean, so padding is zero after normalising."""
        return tuple(255.0 * m for m in self.clip.mean)  # type: ignore[return-value]

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) RGB in 0..255 -> (N, E) normalised embeddings."""
        mean, std = self.clip.pixel_stats()
        x = normalize(images.to(self.clip.device) / 255.0, mean, std).to(self.clip.dtype)
        visual = self.clip.visual
        pool_ok = getattr(visual, "attn_pool", None) is None and getattr(visual, "pool_type", "tok") == "tok"
        if self.is_vit and pool_ok:
            tokens, _ = clip_vit.embed(visual, x)
            stop = clip_vit.num_blocks(visual) - (1 if self.config.classifier_skip_last_block else 0)
            tokens, _ = clip_vit.run_blocks(visual, tokens, 0, stop)
            feats = clip_vit.project_tokens(visual, tokens[:, :1])[:, 0]
        else:  # other architectures: their own pooled forward (no block to skip)
            feats = self.clip.model.encode_image(x)
        return F.normalize(feats.float(), dim=-1)


# --- the recurrence -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoopStep:
    """One step: the live queries (ids), their own-prompt scores P[i, i], and the survivors (ids)."""

    queries: tuple[int, ...]
    scores: tuple[float, ...]
    survivors: tuple[int, ...]


@dataclass
class LoopResult:
    """The recurrence's output: final query ids, their proposals (len, H, W), scores (0 = not kept)."""

    queries: list[int]
    proposals: torch.Tensor
    scores: torch.Tensor
    steps: list[LoopStep]


def step_limit(num_queries: int, max_steps: int = 0) -> int:
    """Most steps the loop may take: N + 1 (see the module docstring), or ``max_steps`` if smaller and > 0."""
    bound = num_queries + 1
    return min(bound, max_steps) if max_steps > 0 else bound


def run_recurrence(
    num_queries: int,
    propose: Callable[[list[int], int], torch.Tensor],
    score: Callable[[torch.Tensor, list[int]], torch.Tensor],
    threshold: float,
    max_steps: int = 0,
    step_dependent: bool = False,
    reuse_whole_stack: bool = False,
    keep_best: bool = True,
) -> LoopResult:
    """Run CaR's loop over query ids 0..N-1, counting survivors as the authors' ``_forward_car`` does.

    Each step proposes a mask per live query and scores the prompted images; the queries whose own score
    P[i, i] exceeds θ survive. When none does, the best-scoring query is kept instead: the authors'
    ``_filter_texts`` appends its index to the survivor list *in place*, so it also counts as a positive in
    ``all_scores`` and the loop goes on with it alone (an empty first step is no reason to stop; the lone
    query then scores 1 in a softmax over one entry). The loop stops when the number of positives (kept
    queries with a score > 0) equals the previous step's (0 before step 1).

    Args:
        propose: (live ids, step from 1) -> (A, H, W) proposals, one per live id in order.
        score: (proposals, live ids) -> (A, A) probabilities; row i = prompted image of proposal i,
            column j = live query j. Only the diagonal decides.
        threshold: θ; a query survives when its diagonal entry is strictly greater.
        step_dependent: step 1 differs from later steps for the same queries (raw CAM names), so an
            unchanged live set after step 1 must still be run once more.
        reuse_whole_stack: after a step whose proposals are all zero, the output keeps the previous step's
            whole stack, paired with the live queries by position (the authors' code); False (fix): the
            previous rows *of the live queries*.
        keep_best: the authors' rule above. False (not in the reference): a step where nobody passes θ
            ends the loop with nothing kept (all scores 0), so a vocabulary can be rejected as a whole
            (with ``classifier_negatives`` even a single query).

    Returns the last step's live queries, the proposals to refine (row j belongs to query j) and the scores
    (0 for queries the step did not keep).
    """
    if num_queries <= 0:
        raise ValueError("the recurrence needs at least one query")
    active = list(range(num_queries))
    last_count = 0
    prev: Optional[tuple[list[int], torch.Tensor]] = None
    steps: list[LoopStep] = []
    limit = step_limit(num_queries, max_steps)
    for step in range(1, limit + 1):
        props = propose(active, step)
        # Scored as proposed: an (almost) empty proposal is the unprompted image, as the authors' prompts.
        diag = torch.diagonal(score(props, active)).float()
        if sync_free(diag.device):
            out = _sync_free_step(diag, props, prev, active, step, threshold, keep_best, step_dependent,
                                  reuse_whole_stack, last_count, limit, steps)
            if isinstance(out, LoopResult):
                return out
            prev, active, last_count = out
            continue
        diag = diag.cpu()
        if prev is not None and not bool((props > 0).any()):
            prev_ids, prev_props = prev  # live ids are a subset of the previous step's
            props = prev_props if reuse_whole_stack else prev_props[[prev_ids.index(q) for q in active]]
        keep = torch.nonzero(diag > threshold).flatten().tolist()  # float32 comparison, as the authors'
        if not keep and not keep_best:
            steps.append(LoopStep(tuple(active), tuple(float(v) for v in diag), ()))
            return LoopResult(list(active), props, torch.zeros_like(diag), steps)
        kept = keep or [int(diag.argmax())]  # the authors' in-place append of the best query
        count = sum(1 for i in kept if float(diag[i]) > 0)
        steps.append(LoopStep(tuple(active), tuple(float(v) for v in diag), tuple(active[i] for i in kept)))
        nxt = [active[i] for i in kept]
        if count == last_count:
            break  # the number of positives stopped changing
        if nxt == active and not (step == 1 and step_dependent):
            break  # the next step would repeat this one exactly, then stop
        if step == limit:
            break  # capped: report this step's queries
        prev, active, last_count = (active, props), nxt, count  # (whole-stack mode never reads the ids)
    scores = torch.zeros_like(diag)
    scores[kept] = diag[kept]
    return LoopResult(list(active), props, scores, steps)


def _sync_free_step(
    diag: torch.Tensor, props: torch.Tensor, prev: Optional[tuple[list[int], torch.Tensor]], active: list[int],
    step: int, threshold: float, keep_best: bool, step_dependent: bool, reuse_whole_stack: bool, last_count: int,
    limit: int, steps: list[LoopStep],
) -> "LoopResult | tuple[tuple[list[int], torch.Tensor], list[int], int]":
    """One step's decision of :func:`run_recurrence` in the sync-free mode: ONE host read per step.

    The decision (who survives, whether to stop) is what the next step's shapes depend on, so it is read: the
    diagonal and the "any proposal" flag come back in one ``tolist`` (one wait), and the rules run on those
    Python numbers. The alternative, a fixed number of steps over all N queries with a survivor mask on the
    device, repeats stage 1 and stage 2 for dead queries and converged steps; measured 2-3x the work of the
    realtime preset per frame (benchmarks/bench_host_sync.py), against one wait per step (at most
    ``max_steps``, 3 in the realtime preset). The scores stay on the device.
    Returns the finished :class:`LoopResult`, or the next (prev, active, last_count).
    """
    flag = (props > 0).any() if prev is not None else torch.ones((), dtype=torch.bool, device=diag.device)
    vals = torch.cat([diag, flag.to(diag.dtype).view(1)]).tolist()  # the step's one wait
    values, any_props = vals[:-1], vals[-1] > 0
    if not any_props:
        prev_ids, prev_props = prev  # type: ignore[misc]
        props = prev_props if reuse_whole_stack else prev_props.index_select(
            0, upload([prev_ids.index(q) for q in active], prev_props.device, torch.long))
    thr = float(np.float32(threshold))  # the float32 comparison of the host path, exactly
    keep = [i for i, v in enumerate(values) if v > thr]
    if not keep and not keep_best:
        steps.append(LoopStep(tuple(active), tuple(values), ()))
        return LoopResult(list(active), props, torch.zeros_like(diag), steps)
    kept = keep or [max(range(len(values)), key=lambda i: (values[i], -i))]  # argmax: the first maximum
    count = sum(1 for i in kept if values[i] > 0)
    steps.append(LoopStep(tuple(active), tuple(values), tuple(active[i] for i in kept)))
    nxt = [active[i] for i in kept]
    if count == last_count or (nxt == active and not (step == 1 and step_dependent)) or step == limit:
        chosen = [1.0 if i in kept else 0.0 for i in range(len(values))]
        return LoopResult(list(active), props, diag * upload(chosen, diag.device, diag.dtype), steps)
    return (active, props), nxt, count


# --- refinement, painting, merging (pure) -------------------------------------------------------------
def unary_labels(proposals: torch.Tensor, bg_factor: float = 1.0) -> torch.Tensor:
    """Argmax over [(1 - max)^f, proposals]: (H, W) long, 0 = background, k = proposal k-1."""
    bg = (1.0 - proposals.max(dim=0, keepdim=True).values).clamp(min=0).pow(bg_factor)
    return torch.cat([bg, proposals]).argmax(dim=0)


def masks_from_labels(labels: torch.Tensor, count: int) -> torch.Tensor:
    """(H, W) labels with 0 = background -> (count, H, W) bool, always ``count`` masks."""
    return labels[None] == torch.arange(1, count + 1, device=labels.device).view(-1, 1, 1)


def paint_labels(
    masks: np.ndarray, scores: np.ndarray, is_stuff: Sequence[bool]
) -> tuple[np.ndarray, np.ndarray]:
    """Label map from per-class masks: stuff first, then things, each in ascending score; only score > 0.

    Later (higher-scoring) classes overwrite earlier ones. Returns (labels int32 with UNLABELED, confidence
    float32 = the painted class's score).
    """
    k, h, w = masks.shape
    labels = np.full((h, w), UNLABELED, dtype=np.int32)
    conf = np.zeros((h, w), dtype=np.float32)
    stuff = np.asarray(is_stuff, dtype=bool)
    for group in (np.flatnonzero(stuff), np.flatnonzero(~stuff)):
        for c in group[np.argsort(scores[group], kind="stable")]:
            if scores[c] > 0:
                labels[masks[c]] = c
                conf[masks[c]] = scores[c]
    return labels, np.clip(conf, 0.0, 1.0)


def paint_labels_on_device(
    masks: torch.Tensor, scores: torch.Tensor, is_stuff: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`paint_labels` as one fixed-shape step on the masks' device (the sync-free mode): each pixel takes
    the class painted last, i.e. the highest (thing, score, index) among the classes covering it with score > 0.
    Returns (labels int32, confidence float32) tensors."""
    k = masks.shape[0]
    dev = masks.device
    scores = scores.to(dev).float()
    thing = ~upload(list(is_stuff), dev, torch.bool)
    by_score = torch.argsort(scores, stable=True)  # ascending, ties in index order: the host loop's order
    order = by_score[torch.argsort(thing[by_score].int(), stable=True)]  # stuff first, then things
    rank = torch.empty(k, dtype=torch.long, device=dev)
    rank[order] = torch.arange(k, device=dev)
    paint = masks.bool() & (scores > 0).view(-1, 1, 1)
    top = torch.where(paint, rank.view(-1, 1, 1), -1).amax(dim=0)  # (H, W) rank of the last painter, -1 none
    winner = order[top.clamp(min=0)]
    labels = torch.where(top >= 0, winner.to(torch.int32), UNLABELED)
    conf = torch.where(top >= 0, scores[winner], 0.0).clamp(0, 1)
    return labels, conf


def merge_referring_masks(
    masks: torch.Tensor, scores: torch.Tensor, threshold: float = 0.5, min_cover: float = 0.05
) -> torch.Tensor:
    """One mask from several sentences' masks (K, H, W): score-weighted mean >= ``threshold``.

    If that covers at most ``min_cover`` of the image (or all scores are 0), the union of the masks.
    """
    m = masks.float()
    s = scores.float().to(m.device)
    h, w = m.shape[-2:]
    merged = torch.zeros((h, w), dtype=torch.bool, device=m.device)
    if float(s.sum()) > 0:
        merged = (m * s.view(-1, 1, 1)).sum(0) / s.sum() >= threshold
    if float(merged.sum()) <= min_cover * h * w:
        merged = (m > 0).any(0)
    return merged


def match_external_masks(
    masks: torch.Tensor,
    candidates: torch.Tensor,
    iom_threshold: float,
    min_pred_threshold: float,
    matching_threshold: float,
) -> torch.Tensor:
    """Replace CaR masks (K, H, W) by unions of matching candidate masks (M, H, W), as the paper describes.

    Per non-empty mask: IoM with each candidate = max(∩/|candidate|, ∩/|mask|), the first term zeroed where
    ∩/|mask| < ``min_pred_threshold``; candidates with IoM > ``iom_threshold`` are unioned (the best one when
    none passes); the union replaces the mask when their IoU > ``matching_threshold``.
    """
    out = masks.clone().bool()
    if candidates.numel() == 0 or masks.numel() == 0:
        return out
    cand = candidates.to(masks.device).bool().flatten(1).float()  # (M, P)
    area_c = cand.sum(1).clamp(min=1)
    for k in range(masks.shape[0]):
        m = masks[k].flatten().float()
        area_m = float(m.sum())
        if area_m == 0:
            continue
        inter = cand @ m
        iom_cand = inter / area_c
        iom_pred = inter / area_m
        iom_cand = torch.where(iom_pred < min_pred_threshold, torch.zeros_like(iom_cand), iom_cand)
        iom = torch.maximum(iom_cand, iom_pred)
        sel = iom > iom_threshold
        if not bool(sel.any()):
            sel = torch.zeros_like(sel)
            sel[int(iom.argmax())] = True
        union = cand[sel].amax(0)
        iou = float((union * m).sum() / ((union + m) > 0).float().sum().clamp(min=1))
        if iou > matching_threshold:
            out[k] = union.view(masks.shape[1:]) > 0
    return out


# --- state and segmenter ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CarState(VocabularyState):
    """Everything CaR derives from a vocabulary (immutable)."""

    #: One query per class: its names joined by ``synonym_joiner``.
    queries: tuple[str, ...] = ()
    #: CAM texts: raw (step 1) and templated (later steps).
    cam_raw: tuple[str, ...] = ()
    cam_templated: tuple[str, ...] = ()
    #: (K, T, E) classifier text bank.
    text_bank: torch.Tensor = None  # type: ignore[assignment]
    is_stuff: tuple[bool, ...] = ()
    #: Templated background words of the first (thing) pass, overlaps with the vocabulary removed.
    background: tuple[str, ...] = ()
    #: Templated thing queries: the background words of the mutual-background stuff pass.
    thing_background: tuple[str, ...] = ()
    #: (G, T, E) classifier bank of the background words when ``classifier_negatives``, else None.
    negatives: Optional[torch.Tensor] = None


@dataclass
class _Image:
    """Per-image tensors of stage 2, shared by every step and pass."""

    full: torch.Tensor  # (1, 3, H, W) float 0..255
    work: torch.Tensor  # the same at the prompt working size
    outside: dict[tuple[str, ...], Optional[torch.Tensor]]
    uint8: Optional[np.ndarray] = None  # (H, W, 3) of ``work`` for the authors' prompt path


@dataclass
class _Pass:
    ids: list[int]
    background: tuple[str, ...]
    kinds: tuple[str, ...]
    bg_factor: float


@register_segmenter("car")
class CarSegmenter(Segmenter):
    """CLIP as RNN. See the module docstring.

    Attributes:
        mask_source: optional external masks (see :data:`MaskSource`); None = CRF output as is.
        last_loops: the :class:`LoopResult` of each pass of the latest call (diagnostics, benchmarks).
    """

    config_cls = CarConfig
    primary_model_field = "cam_model"

    def __init__(
        self,
        config: CarConfig,
        stage1: ProposalSource,
        classifier: PromptClassifier,
        cam_clip: Optional[ClipModel] = None,
        mask_source: Optional[MaskSource] = None,
    ) -> None:
        super().__init__(config, classifier.clip.device)
        _validate(config)
        self.stage1 = stage1
        self.classifier = classifier
        self.cam_clip = cam_clip
        self.mask_source = mask_source
        self.last_loops: list[LoopResult] = []

    # The exported CAM ViT pass (core/deploy.py) is used by stage 1, which holds the ClipCam.
    @property  # type: ignore[override]
    def image_encoder(self) -> Optional[Any]:
        return self.__dict__.get("_image_encoder")

    @image_encoder.setter
    def image_encoder(self, value: Optional[Any]) -> None:
        self.__dict__["_image_encoder"] = value
        stage1 = self.__dict__.get("stage1")
        if isinstance(stage1, ClipEsProposals):
            stage1.encoder = value

    def image_graph(self) -> Optional["ImageGraph"]:
        """Stage 1's ViT pass on the CAM model (blocks 1..L-1, attention maps, image embedding); the per-query
        Grad-CAM backward, the stage-2 classifier and the CRF stay in torch. One static size per file."""
        if not isinstance(self.stage1, ClipEsProposals):
            return None
        from ..cam import prepared_size
        from ..deploy import ImageGraph

        cam = self.stage1.cam
        p = clip_vit.patch_size(cam.visual)
        return ImageGraph(cam.encode_graph(True), ("block_input", "attention", "embedding"),
                          {"attn_layers": cam.attn_layers, "pos_mode": cam.pos_mode},
                          lambda h, w: prepared_size(h, w, p, 0, self.config.cam_max_side), p, static=True)

    @classmethod
    def from_config(
        cls,
        config: CarConfig,
        device: str | torch.device = "cpu",
        cache_dir: str = "",
        offline: bool = True,
        mask_source: Optional[MaskSource] = None,
        text_cache_mb: float = DEFAULT_TEXT_CACHE_MB,
    ) -> "CarSegmenter":
        _validate(config)  # before loading weights
        cam_clip = load_clip(config.cam_model, device, cache_dir=cache_dir or None, offline=offline)
        cam_text = TextEncoder(cam_clip, cache_dir, max_memory_bytes=text_cache_bytes(text_cache_mb))
        if config.classifier_model == config.cam_model:
            cls_clip, cls_text = cam_clip, cam_text  # refcoco-style: one model serves both stages
        else:
            cls_clip = load_clip(config.classifier_model, device, cache_dir=cache_dir or None, offline=offline)
            cls_text = TextEncoder(cls_clip, cache_dir, max_memory_bytes=text_cache_bytes(text_cache_mb))
        stage1 = ClipEsProposals(cam_clip, cam_text, config)
        return cls(config, stage1, PromptClassifier(cls_clip, cls_text, config), cam_clip, mask_source)

    # --- text -----------------------------------------------------------------------------------------
    def _make_state(self, vocabulary: Vocabulary, queries: Sequence[str]) -> CarState:
        cfg = self.config
        queries = tuple(queries)
        text_bank = self.classifier.encode_queries(queries)  # raises VocabularyError on over-long prompts
        cam_tpl = tuple(cfg.cam_template.format(q) for q in queries)
        words = list(background_without_classes(cfg.background_words, vocabulary, queries)
                     if cfg.drop_background_overlaps else cfg.background_words)
        is_stuff = tuple(not c.is_thing for c in vocabulary.classes)
        thing_bg = tuple(cam_tpl[i] for i, s in enumerate(is_stuff) if not s)
        background = tuple(cfg.cam_template.format(w) for w in words)
        negatives = self.classifier.encode_queries(words) if cfg.classifier_negatives and words else None
        warm = getattr(self.stage1, "warm", None)
        if callable(warm):
            warm(list(queries) + list(cam_tpl) + list(background))
        return CarState(
            vocabulary=vocabulary,
            queries=queries,
            cam_raw=queries,
            cam_templated=cam_tpl,
            text_bank=text_bank,
            is_stuff=is_stuff,
            background=background,
            thing_background=thing_bg,
            negatives=negatives,
        )

    def encode_vocabulary(self, vocabulary: Vocabulary) -> CarState:
        return self._make_state(vocabulary, [self.config.synonym_joiner.join(c.names) for c in vocabulary.classes])

    def describe_prompts(self, state: VocabularyState) -> list[list[str]]:
        """Per class: the CAM texts (step 1, later steps) and the classifier prompts."""
        st: CarState = state  # type: ignore[assignment]
        out = []
        for i, q in enumerate(st.queries):
            cam = [st.cam_raw[i]] if self.config.cam_raw_names_first_step else []
            out.append(list(dict.fromkeys(cam + [st.cam_templated[i]] + format_prompts(q, self.config.templates))))
        return out

    # --- image ----------------------------------------------------------------------------------------
    def _image(self, image: np.ndarray) -> _Image:
        full = image_to_tensor(image, self.classifier.clip.device) * 255.0
        work = full
        cap = self.config.prompt_max_side
        h, w = image.shape[:2]
        if cap > 0 and max(h, w) > cap:
            s = cap / max(h, w)
            size = (max(1, round(h * s)), max(1, round(w * s)))
            work = F.interpolate(full, size=size, mode="bilinear", align_corners=False, antialias=True).round()
        return _Image(full, work, {})

    def _classify(
        self,
        img: _Image,
        props: torch.Tensor,
        text: torch.Tensor,
        kinds: tuple[str, ...],
        negatives: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(A, H, W) proposals -> (A, A) ensemble probabilities of their prompted images vs ``text`` (A, T, E).

        ``negatives`` (G, T, E) join the softmax as extra columns, which are then dropped.
        """
        feats = self.classifier.embed(self._prompt_batch(img, props, kinds))  # one forward for the whole step
        a = text.shape[0]
        if negatives is not None:
            text = torch.cat([text.to(feats.device), negatives.to(feats.device)])
        return template_ensemble(feats, text.to(feats.device), self.config.classifier_logit_scale)[:, :a]

    def _prompt_batch(self, img: _Image, props: torch.Tensor, kinds: tuple[str, ...]) -> torch.Tensor:
        """(A, H, W) proposals -> (A, 3, S, S) prompted classifier inputs in 0..255 (before CLIP's normalisation)
        on the configured ``prompt_backend``; the parity harness records them (``gray_order`` changes only these)."""
        cfg = self.config
        props = props.to(img.work.device).float()
        valid = props.flatten(1).sum(1) > 1  # the authors leave an (almost) empty proposal unprompted
        if tuple(props.shape[-2:]) != tuple(img.work.shape[-2:]):
            props = F.interpolate(props[None], size=img.work.shape[-2:], mode="bilinear", align_corners=False)[0]
        masks = (props > cfg.mask_threshold) & valid.view(-1, 1, 1)
        if cfg.prompt_backend == "authors":
            return self._authors_batch(img, masks, valid, kinds)
        if kinds not in img.outside:
            img.outside[kinds] = outside_appearance(img.work, kinds, cfg.blur_kernel, cfg.gray_order)
        batch = []
        for s in range(0, masks.shape[0], max(1, cfg.prompt_chunk)):
            prompted = apply_visual_prompts(img.work, masks[s:s + cfg.prompt_chunk], kinds, cfg.prompt_color,
                                            cfg.prompt_thickness, cfg.blur_kernel, cfg.gray_order,
                                            outside=img.outside[kinds])
            batch.append(to_classifier_input(prompted, self.classifier.input_size, cfg.keep_full_image,
                                             self.classifier.fill()))
        return torch.cat(batch)

    def _authors_batch(
        self, img: _Image, masks: torch.Tensor, valid: torch.Tensor, kinds: tuple[str, ...]
    ) -> torch.Tensor:
        """Prompted classifier inputs (N, 3, S, S) in 0..255 composed as the authors do: OpenCV on the uint8
        image, then CLIP's stock PIL preprocessing (or our padding under ``keep_full_image``)."""
        cfg = self.config
        if img.uint8 is None:
            img.uint8 = img.work[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        size = self.classifier.input_size
        out = []
        for m, ok in zip(masks.cpu().numpy(), valid.cpu().tolist()):
            pic = reference_prompt(img.uint8, m, kinds, cfg.prompt_color, cfg.prompt_thickness,
                                   cfg.blur_kernel, cfg.gray_order) if ok else img.uint8
            if cfg.keep_full_image:
                t = torch.from_numpy(np.ascontiguousarray(pic)).permute(2, 0, 1)[None].float()
                out.append(to_classifier_input(t, size, True, self.classifier.fill()))
            else:
                arr = reference_classifier_input(pic, size)
                out.append(torch.from_numpy(arr).permute(2, 0, 1)[None].float())
        return torch.cat(out).to(self.classifier.clip.device)

    def _loop(
        self, prepared: Any, img: _Image, st: CarState, p: _Pass, separate: bool, timer: StageTimer,
        char_filter: bool = False,
    ) -> LoopResult:
        cfg = self.config
        bank = st.text_bank
        chars = self._char_bank(st, p) if char_filter else None

        def propose(active: list[int], step: int) -> torch.Tensor:
            raw = step == 1 and cfg.cam_raw_names_first_step
            texts = [(st.cam_raw if raw else st.cam_templated)[p.ids[a]] for a in active]
            with timer.stage("cam"):
                return self.stage1.propose(prepared, texts, p.background, separate)

        calls = [0]  # score runs once per step

        def score(props: torch.Tensor, active: list[int]) -> torch.Tensor:
            calls[0] += 1
            with timer.stage("classify"):
                # from step 2 on the texts have been through the authors' _filter_texts once: characters
                if chars is not None and calls[0] > 1:
                    text = chars(active)
                else:
                    text = bank.index_select(0, upload([p.ids[a] for a in active], bank.device, torch.long))
                return self._classify(img, props, text, p.kinds, st.negatives)

        return run_recurrence(len(p.ids), propose, score, cfg.confidence_threshold, cfg.max_steps,
                              cfg.cam_raw_names_first_step, cfg.reuse_whole_stack, cfg.keep_best_when_empty)

    def _char_bank(self, st: CarState, p: _Pass) -> Callable[[list[int]], torch.Tensor]:
        """``refer_char_filter``: live ids -> (A, N, E) embeddings of character q of each step-1 prompt j."""
        templates = self.config.templates
        if len(templates) != 1:
            raise ValueError("car: refer_char_filter reproduces the authors' single-template referring configs; "
                             f"it needs exactly one template, got {len(templates)}")
        prompts = [templates[0].format(st.queries[p.ids[j]]) for j in range(len(p.ids))]

        def bank(active: list[int]) -> torch.Tensor:
            short = [q for q in active if any(q >= len(t) for t in prompts)]
            if short:  # the authors' code raises IndexError here
                raise ValueError(f"car: refer_char_filter: text {short[0]} has no character in a prompt this short")
            rows = [self.classifier.text.encode_group([t[q] for t in prompts]) for q in active]
            return torch.stack(rows).float()

        return bank

    def _refine(
        self, image: np.ndarray, proposals: torch.Tensor, separate: bool, bg_factor: float, timer: StageTimer
    ) -> torch.Tensor:
        """(A, H, W) proposals -> (A, H, W) bool masks: dense CRF (joint or per mask), then external masks."""
        with timer.stage("refine"):
            props = proposals.float()
            if tuple(props.shape[-2:]) != tuple(image.shape[:2]):
                props = F.interpolate(props[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
            groups = [props[i:i + 1] for i in range(props.shape[0])] if separate else [props]
            crf_img = authors_crf_image(image) if self.config.crf_image == "authors" else image
            masks = torch.cat([self._crf_masks(crf_img, g, bg_factor) for g in groups])
            if separate and self.config.crf_onehot_shift:
                # The authors' one_hot drops an all-background result: later masks move up, zeros at the end.
                full = masks[masks.flatten(1).any(1)]
                masks = torch.cat([full, torch.zeros_like(masks[:masks.shape[0] - full.shape[0]])])
        if self.mask_source is not None:
            with timer.stage("external_masks"):
                src = self.mask_source(image)
                cand = (src if isinstance(src, torch.Tensor) else torch.from_numpy(np.asarray(src))).bool()
                if cand.ndim != 3 or tuple(cand.shape[1:]) != tuple(image.shape[:2]):
                    raise ValueError(f"car: mask_source must return (M, {image.shape[0]}, {image.shape[1]}) "
                                     f"masks, got shape {tuple(cand.shape)}")
                cfg = self.config
                masks = match_external_masks(masks, cand, cfg.iom_threshold, cfg.min_pred_threshold,
                                             cfg.matching_threshold)
        return masks

    def _crf_masks(self, image: np.ndarray, props: torch.Tensor, bg_factor: float) -> torch.Tensor:
        if self.config.crf:
            labels = _crf_labels(image, props, bg_factor, self.config.crf_max_side)
        else:
            labels = unary_labels(props, bg_factor)
        return masks_from_labels(labels.to(props.device), props.shape[0])

    def _passes(self, st: CarState) -> list[_Pass]:
        cfg = self.config
        kinds, stuff_kinds = check_kinds(cfg.visual_prompts), check_kinds(cfg.stuff_visual_prompts)
        stuff = [i for i, s in enumerate(st.is_stuff) if s]
        things = [i for i, s in enumerate(st.is_stuff) if not s]
        if not (cfg.mutual_background and stuff):
            return [_Pass(list(range(len(st.queries))), st.background, kinds, cfg.bg_factor)]
        passes = [_Pass(things, st.background, kinds, cfg.bg_factor)] if things else []
        passes.append(_Pass(stuff, st.thing_background, stuff_kinds, cfg.stuff_bg_factor))
        return passes

    # --- the contract ---------------------------------------------------------------------------------
    def segment(self, image: np.ndarray, state: Optional[VocabularyState] = None) -> SegmentationResult:
        st: CarState = self._resolve_state(state)  # type: ignore[assignment]
        image = check_image(image)
        timer = StageTimer(self.device)
        k = len(st.queries)
        masks = np.zeros((k,) + image.shape[:2], dtype=bool)
        scores = np.zeros(k, dtype=np.float32)
        loops = []
        with timer.stage("cam_encode"):
            prepared = self.stage1.prepare(image)
        img = self._image(image)
        if sync_free(self.device):
            return self._segment_on_device(image, st, prepared, img, timer)
        for p in self._passes(st):
            res = self._loop(prepared, img, st, p, separate=False, timer=timer)
            refined = self._refine(image, res.proposals, False, p.bg_factor, timer).cpu().numpy()
            for j, q in enumerate(res.queries):
                masks[p.ids[q]] = refined[j]
                scores[p.ids[q]] = float(res.scores[j])
            loops.append(res)
        with timer.stage("paint"):
            labels, conf = paint_labels(masks, scores, st.is_stuff)
        self.last_loops = loops
        return SegmentationResult(labels, conf, st.vocabulary, timings=timer.times)

    def _segment_on_device(self, image: np.ndarray, st: CarState, prepared: Any, img: _Image,
                           timer: StageTimer) -> SegmentationResult:
        """:meth:`segment` in the sync-free mode: masks, scores and painting stay on the device and the planes
        come back in one copy; what still waits is one read per loop step (:func:`_sync_free_step`) and the
        dense CRF's lattice construction (its size depends on the image: ``torch.unique``)."""
        k = len(st.queries)
        h, w = image.shape[:2]
        dev = self.device
        masks = torch.zeros((k, h, w), dtype=torch.bool, device=dev)
        scores = torch.zeros(k, dtype=torch.float32, device=dev)
        loops = []
        for p in self._passes(st):
            res = self._loop(prepared, img, st, p, separate=False, timer=timer)
            refined = self._refine(image, res.proposals, False, p.bg_factor, timer)
            rows = upload([p.ids[q] for q in res.queries], dev, torch.long)
            masks.index_copy_(0, rows, refined.to(dev).bool())
            scores.index_copy_(0, rows, res.scores.to(dev).float())
            loops.append(res)
        with timer.stage("paint"):
            labels, conf = paint_labels_on_device(masks, scores, st.is_stuff)
            labels_np, conf_np = to_host(labels, conf)
        self.last_loops = loops
        return SegmentationResult(labels_np, conf_np, st.vocabulary, timings=timer.times)

    def _referring(self, image: np.ndarray, texts: list[str],
                   char_filter: bool = False) -> tuple[list[np.ndarray], list[float], dict]:
        """Referring-mode loop: the final mask and score of each text (texts the loop dropped: empty, 0; the
        best text is never dropped unless ``keep_best_when_empty`` is off, as the authors' loop)."""
        image = check_image(image)
        vocab = vocabulary_from_texts(texts)  # validates: non-empty, no empty texts
        timer = StageTimer(self.device)
        with timer.stage("text"):
            st = self._make_state(vocab, [t.strip() for t in texts])
        with timer.stage("cam_encode"):
            prepared = self.stage1.prepare(image)
        img = self._image(image)
        p = _Pass(list(range(len(texts))), st.background, check_kinds(self.config.visual_prompts),
                  self.config.bg_factor)
        res = self._loop(prepared, img, st, p, separate=True, timer=timer, char_filter=char_filter)
        refined = self._refine(image, res.proposals, True, p.bg_factor, timer).cpu().numpy()
        masks = [np.zeros(image.shape[:2], dtype=bool) for _ in texts]
        scores = [0.0] * len(texts)
        for j, q in enumerate(res.queries):
            masks[q] = refined[j]
            scores[q] = float(res.scores[j])
        self.last_loops = [res]
        return masks, scores, timer.times

    def query(self, image: np.ndarray, texts: Sequence[str]) -> QueryResult:
        """Referring mode: one mask and score per text; a text the loop does not keep gets score 0 and an
        empty mask."""
        texts = list(texts)
        masks, scores, times = self._referring(image, texts)
        masks = [m if s > 0 else np.zeros_like(m) for m, s in zip(masks, scores)]
        return QueryResult(texts, masks, scores, times)

    def refer(self, image: np.ndarray, sentences: Sequence[str]) -> tuple[np.ndarray, float]:
        """Several sentences about one object -> one mask (score-weighted merge, else the union, as the
        authors evaluate RefCOCO) and the best score."""
        masks, scores, _ = self._referring(image, list(sentences), self.config.refer_char_filter)
        merged = merge_referring_masks(torch.from_numpy(np.stack(masks)), torch.tensor(scores),
                                       self.config.refer_merge_threshold, self.config.refer_min_cover)
        return merged.numpy(), max(scores)

    @torch.inference_mode()
    def backbone_forward(self, image: np.ndarray) -> None:
        """One bare forward of the CAM backbone at the size stage 1 uses."""
        clip = self.cam_clip or self.classifier.clip
        clip_vit.bare_forward(clip.visual, prepare_image(clip, check_image(image), resize=self.config.cam_resize,
                                                         max_long_side=self.config.cam_max_side))

    @torch.inference_mode()
    def classifier_forward(self, batch: int = 1) -> None:
        """One bare forward of the classifier on ``batch`` images at its input size (benchmark baseline)."""
        s = self.classifier.input_size
        self.classifier.embed(torch.zeros((batch, 3, s, s), device=self.classifier.clip.device))

    def to(self, device: torch.device | str) -> "CarSegmenter":
        super().to(device)
        if self.cam_clip is not None:
            self.cam_clip.to(device)
        self.classifier.clip.to(device)
        return self


def _validate(cfg: CarConfig) -> None:
    """Fail at build time, naming the option, rather than on the first frame."""
    check_kinds(cfg.visual_prompts)
    check_kinds(cfg.stuff_visual_prompts)
    if cfg.gray_order not in ("rgb", "bgr"):
        raise ValueError(f"car: gray_order must be 'rgb' or 'bgr', got {cfg.gray_order!r}")
    choices = {"cam_resize": RESIZE_MODES, "prompt_backend": ("torch", "authors"), "crf_image": ("rgb", "authors")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"car: {name} must be one of {allowed}, got {getattr(cfg, name)!r}")
    if cfg.blur_kernel < 1 or cfg.blur_kernel % 2 == 0:
        raise ValueError(f"car: blur_kernel must be odd and positive, got {cfg.blur_kernel}")
    bad = [t for t in (cfg.cam_template, *cfg.templates) if "{}" not in t]
    if not cfg.templates or bad:
        raise ValueError(f"car: templates must be non-empty and each contain '{{}}'; bad: {bad}")
    for name in ("mask_threshold", "cam_threshold", "refer_merge_threshold", "refer_min_cover"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"car: {name} must be in [0, 1], got {getattr(cfg, name)}")


def _crf_labels(image: np.ndarray, probs: torch.Tensor, bg_factor: float, max_side: int = 0) -> torch.Tensor:
    """Dense CRF (the shared :mod:`ovseg_ros.core.crf`, the authors' parameters) over [(1 - max)^f, probs],
    then argmax: (H, W) long, 0 = background. With ``max_side`` > 0 the CRF runs on a copy whose long side is
    at most that, and its marginals are upsampled bilinearly (the CRF's cost grows with the pixel count)."""
    bg = (1.0 - probs.max(dim=0, keepdim=True).values).clamp(min=0).pow(bg_factor)
    p = torch.cat([bg, probs]).float()
    return dense_crf_capped(image, p, max_side).argmax(dim=0)
