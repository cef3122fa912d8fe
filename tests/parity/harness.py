"""Golden-number parity harness: every segmenter paper preset on a fixed seeded tiny model, image and vocabulary.

Each case records a few intermediate stages as small fingerprints (shape, sum, sum of absolute values and
16 values sampled at fixed flat positions) and the final labels as per-class pixel counts plus sampled
pixels. ``goldens/<segmenter>-<preset>.json`` holds what this implementation produced after it was checked
stage by stage against the authors' code (issue 11); ``test_parity.py`` fails when a stage drifts beyond
float tolerance. Regenerate with ``python tests/parity/regen.py`` only for a deliberate change, in the same
commit, saying why. Goldens depend on the random initialisation of the pinned torch/open_clip versions.

Stages per method (also listed in docs/methods/*.md):

* CLIP-ES: ``input`` (normalised, resized image), ``embedding``, ``gradcam``, ``caa`` (refined CAMs),
  ``probs`` (background + classes after the CRF), ``labels``.
* CaR: ``input`` (stage-1 image), ``proposals`` (step-1 proposals), ``step_scores`` (diagonal scores of
  every step of the loop, concatenated), ``steps`` (live-set size per step), ``labels``; referring presets
  record ``masks`` and ``scores`` of :meth:`query` instead of labels.
* ITACLIP: ``input``, ``logits`` (window-averaged, processing size), ``labels``; at short side 224 (five
  224-pixel windows) to stay fast.
* FC-CLIP: ``input``, ``class_probs`` (geometric ensemble), ``mask_logits``, ``labels`` (semantic) and
  ``panoptic`` (segment ids' class counts), ``segments`` (class and thing flag of every panoptic segment).
  Inputs at a small size (``min_size`` 64) to stay fast. Vocabulary :data:`FC_VOCAB`: a capitalised name
  ("Chair": not an exact name of the authors' COCO list, a COCO synonym by our rule) and classes whose
  guessed thing flag is not COCO's, so ``seen_rule`` and ``thing_from`` decide outputs.

Switch probes (``sw_*`` stages), so that every documented authors' switch of a preset changes its golden
(``test_switches.py`` flips each one): CLIP-ES and CaR record their CAMs/proposals once more at a sharp
softmax temperature (:data:`SHARP`), where non-winning classes' CAMs peak far below 1e-7 (the min-max
epsilon decides), for a vocabulary that contains six of the method's background words
(``drop_background_overlaps`` decides whether they stay in the softmax).
CaR also records: stage-2 probabilities of one fixed mask under a ``gray`` prompt and that prompted
classifier input itself (``gray_order``, ``prompt_backend``, ``keep_full_image``), the CRF of near-neutral
proposals with one all-zero proposal, joint and per mask (``crf_image``, ``crf_onehot_shift``), a scripted loop with an all-zero step and a step nobody passes
(``reuse_whole_stack``, ``keep_best_when_empty``), and on refcoco ``refer`` at θ 0 (``refer_char_filter``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

GOLDEN_DIR = Path(__file__).resolve().parent / "goldens"
SAMPLES = 16

#: (segmenter, preset) of every paper preset (realtime presets are ours and not covered).
CASES: tuple[tuple[str, str], ...] = (
    ("clip_es", "voc"), ("clip_es", "coco"),
    ("car", "voc"), ("car", "coco_object"), ("car", "pascal_context"), ("car", "ade"), ("car", "demo"),
    ("car", "refcoco"),
    ("itaclip", "voc21"), ("itaclip", "coco_object"), ("itaclip", "coco_stuff"), ("itaclip", "context60"),
    ("itaclip", "cityscapes"),
    ("fcclip", "coco_panoptic"), ("fcclip", "ade20k"), ("fcclip", "cityscapes"),
)

VOCAB = ["floor", "chair", "person, people", "wall", "dog"]
#: FC-CLIP's vocabulary (flags guessed from the names): a capitalised COCO name, and "cabinet" / "pillow",
#: things by the name guess but COCO-panoptic stuff, so ``seen_rule`` and ``thing_from`` decide outputs.
FC_VOCAB = ["floor", "Chair", "person, people", "cabinet", "pillow"]
#: Softmax temperature of the CAM probes (``sw_*`` stages): losers' CAMs then peak far below 1e-7.
SHARP = {"clip_es": 600.0, "car": 300.0}


def probe_vocabulary(background: Sequence[str]) -> list[str]:
    """Two classes and six of the method's own background words: every background word a class overlaps."""
    return VOCAB[:2] + list(background[:6])
QUERIES = ["a red box", "the blue half", "a green square"]
FC_ARCH = {"hidden_dim": 32, "mask_dim": 32, "num_queries": 12, "dec_layers": 3, "dec_heads": 2,
           "dec_ffn_dim": 64, "enc_layers": 2, "enc_heads": 2, "enc_points": 2, "enc_ffn_dim": 64}


def image() -> np.ndarray:
    """60x90 RGB: two halves, a square and seeded noise (not a patch multiple: the resize is exercised)."""
    img = np.zeros((60, 90, 3), dtype=np.float64)
    img[:, :45] = (200, 40, 30)
    img[:, 45:] = (30, 40, 200)
    img[18:42, 30:58] = (40, 190, 50)
    img += np.random.default_rng(0).normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def fingerprint(x: Any) -> dict:
    a = np.asarray(x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    flat = a.reshape(-1)
    idx = np.linspace(0, max(flat.size - 1, 0), num=min(SAMPLES, flat.size)).round().astype(int)
    return {"shape": list(a.shape), "sum": float(flat.sum()), "abs_sum": float(np.abs(flat).sum()),
            "samples": [float(v) for v in flat[idx]]}


def label_print(labels: np.ndarray) -> dict:
    lab = np.asarray(labels).astype(np.int64)
    vals, counts = np.unique(lab, return_counts=True)
    flat = lab.reshape(-1)
    idx = np.linspace(0, flat.size - 1, num=64).round().astype(int)
    return {"shape": list(lab.shape), "counts": {str(int(v)): int(c) for v, c in zip(vals, counts)},
            "samples": [int(v) for v in flat[idx]]}


# --- models ----------------------------------------------------------------------------------------------
def make_weights(folder: Path) -> dict[str, Path]:
    """Seeded random checkpoints: the same bytes on every run of the same torch/open_clip versions."""
    from ovseg_ros.core.fcclip import convert
    from ovseg_ros.core.fcclip.config import FCCLIPArch
    from ovseg_ros.core.fcclip.model import FCCLIPModel
    from ovseg_ros.core.models import register_model_configs, save_random_checkpoint

    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    out = {
        "vit": save_random_checkpoint("ovseg-tiny-vit", folder / "vit.pt", seed=0),
        "vit_l4": save_random_checkpoint("ovseg-tiny-vit-l4", folder / "vit_l4.pt", seed=1),
        "convnext": save_random_checkpoint("ovseg-tiny-convnext", folder / "convnext.pt", seed=0),
    }
    register_model_configs()
    torch.manual_seed(1)
    model = FCCLIPModel(open_clip.create_model("ovseg-tiny-convnext", pretrained=None), FCCLIPArch(**FC_ARCH)).eval()
    with torch.no_grad():  # sharper random queries so the image gets several segments
        model.decoder.query_feat.weight.mul_(3.0)
        model.decoder.mask_embed.layers[-1].weight.mul_(3.0)
        model.decoder.class_embed.layers[-1].weight.mul_(3.0)
        model.decoder.logit_scale.fill_(4.0)
    out["fcclip"] = convert.save_authors_checkpoint(model, folder / "fcclip.pth", include_text_tower=False)
    return out


def _spec(name: str, path: Path) -> dict:
    return {"name": name, "pretrained": "", "checkpoint": str(path), "precision": "fp32"}


def build(segmenter: str, preset: str, weights: dict[str, Path], **extra: Any):
    from ovseg_ros.core.segmenter import build_segmenter

    if segmenter == "car":
        cam = _spec("ovseg-tiny-vit", weights["vit"])
        # refcoco shares one B/16 for both stages; the others classify with the (tiny) L/14 stand-in
        cls = cam if preset == "refcoco" else _spec("ovseg-tiny-vit-l4", weights["vit_l4"])
        over = {"cam_model": cam, "classifier_model": cls, "classifier_input_size": 56}
    elif segmenter == "fcclip":
        over = {"checkpoint": str(weights["fcclip"]), "model": _spec("ovseg-tiny-convnext", weights["convnext"]),
                "arch": FC_ARCH, "min_size": 64, "max_size": 128}
    elif segmenter == "itaclip":  # short side 224: 5 windows instead of 55+ (same code path, fast)
        over = {"model": _spec("ovseg-tiny-vit", weights["vit"]), "short_side": 224}
    else:
        over = {"model": _spec("ovseg-tiny-vit", weights["vit"])}
    over.update(extra)
    return build_segmenter(segmenter, preset, over, device="cpu")


# --- per method ----------------------------------------------------------------------------------------
def _clip_es(seg, img: np.ndarray) -> dict:
    from ovseg_ros.core.cam import refine_with_affinity

    st, cfg = seg.state, seg.config
    x = seg._prepare(img)
    enc = seg.cam.encode(x)
    present = [0, 2, 3]
    cams = seg.cam.gradcam(enc, st.text[present], st.background, list(range(len(present))))
    caa = refine_with_affinity(seg.cam.affinity(enc), cams, cfg.box_threshold, cfg.affinity_power,
                               cfg.clip_box_edges, eps=cfg.cam_eps)
    maps = seg.compute_maps(img, st, present)
    res = seg.segment(img, present=present)
    return {"input": fingerprint(x), "embedding": fingerprint(enc.embedding), "gradcam": fingerprint(cams),
            "caa": fingerprint(caa), "probs": fingerprint(maps.probs), "labels": label_print(res.labels)}


def _clip_es_probes(segmenter: str, preset: str, weights: dict[str, Path], img: np.ndarray, **options: Any) -> dict:
    from ovseg_ros.core.vocabulary import Vocabulary

    sharp = build(segmenter, preset, weights, **{**options, "logit_scale": SHARP["clip_es"]})
    names = probe_vocabulary(sharp.config.background)
    sharp.set_vocabulary(Vocabulary.from_request(names))
    st = sharp.state
    enc = sharp.cam.encode(sharp._prepare(img))
    cams = sharp.cam.gradcam(enc, st.text, st.background, list(range(len(names))))
    return {"sw_sharp_gradcam": fingerprint(cams)}


def _car(seg, img: np.ndarray, preset: str) -> dict:
    prepared = seg.stage1.prepare(img)
    from ovseg_ros.core.cam import prepare_image

    cfg = seg.config
    out = {"input": fingerprint(prepare_image(seg.stage1.clip, img, max_long_side=cfg.cam_max_side,
                                              resize=cfg.cam_resize))}
    st = seg.state
    texts = list(st.cam_raw if cfg.cam_raw_names_first_step else st.cam_templated)
    out["proposals"] = fingerprint(seg.stage1.propose(prepared, texts, st.background, False))
    if preset == "refcoco":
        q = seg.query(img, QUERIES)
        out["masks"] = label_print(np.stack(q.masks).astype(np.int64))
        out["scores"] = fingerprint(torch.tensor(q.scores))
    else:
        res = seg.segment(img)
        out["labels"] = label_print(res.labels)
    loops = seg.last_loops
    out["step_scores"] = fingerprint(torch.tensor([v for lp in loops for s in lp.steps for v in s.scores]))
    out["steps"] = [len(s.queries) for lp in loops for s in lp.steps]
    return out


def _car_probes(seg, preset: str, weights: dict[str, Path], img: np.ndarray, **options: Any) -> dict:
    from ovseg_ros.core.segmenter import StageTimer
    from ovseg_ros.core.segmenters.car import run_recurrence
    from ovseg_ros.core.vocabulary import Vocabulary

    out: dict = {}
    sharp = build("car", preset, weights, **{**options, "cam_logit_scale": SHARP["car"]})
    sharp.set_vocabulary(Vocabulary.from_request(probe_vocabulary(sharp.config.background_words)))
    st = sharp.state
    texts = list(st.cam_raw if sharp.config.cam_raw_names_first_step else st.cam_templated)
    out["sw_sharp_proposals"] = fingerprint(sharp.stage1.propose(sharp.stage1.prepare(img), texts, st.background,
                                                                 False))
    st, cfg = seg.state, seg.config
    h, w = img.shape[:2]
    # stage 2 on one fixed mask (the square, near the right edge of a wide crop) under a gray prompt
    mask = torch.zeros((1, h, w))
    mask[0, 15:45, 55:88] = 1.0
    probs = seg._classify(seg._image(img), mask.repeat(3, 1, 1), st.text_bank[:3], ("gray",), None)
    out["sw_gray_prompt"] = fingerprint(probs)
    # ... and the prompted classifier input itself (0..255, before the model): the red and blue halves outside
    # the mask are 30 gray levels apart between RGB luma and BGR2GRAY on RGB pixels (``gray_order``), which a
    # tiny random classifier may blur below tolerance; a mean and a row through both halves do not
    prompted = seg._prompt_batch(seg._image(img), mask, ("gray",))
    row = prompted[0, 0, prompted.shape[2] // 8]  # above the mask: gray across both halves
    out["sw_gray_image"] = fingerprint(torch.cat([prompted.mean((0, 2, 3)), row]))
    # the CRF of near-neutral proposals (a +-0.03 checkerboard): the image's colours in the pairwise terms
    # decide most pixels; joint (two proposals) and per mask with an all-zero first proposal; the area of
    # every mask in order (a shift moves areas), and the masks subsampled
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    r = 0.5 + 0.03 * (((xs // 6 + ys // 6) % 2) * 2 - 1).float()
    soft = torch.stack([r, 1.0 - r, torch.zeros(h, w)])
    timer = StageTimer("cpu")
    joint = seg._refine(img, soft[:2], False, cfg.bg_factor, timer)
    separate = seg._refine(img, soft[[2, 0, 1]], True, cfg.bg_factor, timer)
    masks = torch.cat([joint, separate]).float()
    out["sw_crf_areas"] = fingerprint(masks.flatten(1).sum(1))
    out["sw_crf"] = fingerprint(masks[:, ::3, ::3])
    # scripted loops: (a) step 2 proposes nothing and ends the loop (which stack is reported?),
    # (b) from step 2 nobody passes θ (is the best query kept?)
    base = torch.stack([torch.full((4, 4), float(i + 1)) for i in range(4)])
    recorded = []
    for zero_step, table in ((2, {1: [0.9, 0.8, 0.1, 0.7], 2: [0.9, 0.8, 0.1, 0.7]}),
                             (0, {1: [0.9, 0.8, 0.1, 0.7], 2: [0.2, 0.3, 0.0, 0.1]})):
        calls: list[int] = []

        def propose(active: list[int], step: int, zero_step: int = zero_step) -> torch.Tensor:
            return torch.zeros((len(active), 4, 4)) if step == zero_step else base[active] * step

        def score(props: torch.Tensor, active: list[int], table: dict = table, calls: list = calls) -> torch.Tensor:
            calls.append(1)
            return torch.diag(torch.tensor([table[min(len(calls), 2)][a] for a in active]))

        res = run_recurrence(4, propose, score, 0.5, reuse_whole_stack=cfg.reuse_whole_stack,
                             keep_best=cfg.keep_best_when_empty)
        recorded += [res.proposals.flatten(), res.scores, torch.tensor(res.queries, dtype=torch.float32)]
    out["sw_loop"] = fingerprint(torch.cat(recorded))
    if preset == "refcoco":  # refer() with every text alive after step 1: the authors' character scoring
        loose = build("car", preset, weights, **{**options, "confidence_threshold": 0.0})
        loose.refer(img, QUERIES)
        steps = [v for lp in loose.last_loops for s in lp.steps for v in s.scores]
        out["sw_refer_steps"] = fingerprint(torch.tensor(steps))
    return out


def _itaclip(seg, img: np.ndarray) -> dict:
    st = seg.state
    x = seg._prepare(img)
    logits = seg._logits(x, st.text)
    res = seg.segment(img)
    return {"input": fingerprint(x), "logits": fingerprint(logits), "labels": label_print(res.labels)}


def _fcclip(seg, img: np.ndarray) -> dict:
    st, cfg = seg.state, seg.config
    x, _ = seg._prepare(img)
    with torch.inference_mode():
        net = seg.network.model(x, st.text, st.owner, st.seen, cfg.alpha, cfg.beta, cfg.ensemble_on_valid_mask)
    pred = seg.predict(img, instances=False)
    pan = pred.result.panoptic
    seg_classes = {int(s.id): int(s.class_id) for s in pan.segments} if pan is not None else {}
    pan_labels = np.vectorize(lambda i: seg_classes.get(int(i), -1))(pan.segment_ids) if pan is not None else []
    segments = sorted([int(s.class_id), int(s.is_thing)] for s in pan.segments) if pan is not None else []
    return {"input": fingerprint(x), "class_probs": fingerprint(net.class_probs), "mask_logits":
            fingerprint(net.mask_logits), "labels": label_print(pred.result.labels),
            "panoptic": label_print(pan_labels), "segments": segments}


def run_case(segmenter: str, preset: str, weights: dict[str, Path], **options: Any) -> dict:
    """The stages of one paper preset; ``options`` override preset values (test_switches flips one)."""
    from ovseg_ros.core.vocabulary import Vocabulary

    torch.manual_seed(0)
    img = image()
    seg = build(segmenter, preset, weights, **options)
    if segmenter == "car" and preset == "refcoco":
        seg.set_vocabulary(Vocabulary.from_request(QUERIES))
    elif segmenter == "fcclip":
        seg.set_vocabulary(Vocabulary.from_request(FC_VOCAB))
    else:
        seg.set_vocabulary(Vocabulary.from_request(VOCAB))
    with torch.no_grad():
        fn: Callable[..., dict] = {"clip_es": _clip_es, "itaclip": _itaclip, "fcclip": _fcclip}.get(segmenter)
        out = _car(seg, img, preset) if segmenter == "car" else fn(seg, img)
    if segmenter == "car":
        with torch.no_grad():
            out.update(_car_probes(seg, preset, weights, img, **options))
    elif segmenter == "clip_es":  # its Grad-CAM needs autograd (the main path enables it itself)
        out.update(_clip_es_probes(segmenter, preset, weights, img, **options))
    return out


def golden_path(segmenter: str, preset: str) -> Path:
    return GOLDEN_DIR / f"{segmenter}-{preset}.json"


def save(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


# --- comparison ----------------------------------------------------------------------------------------
def compare(got: dict, ref: dict, rtol: float = 1e-3, atol: float = 1e-4, label_slack: float = 0.005) -> list[str]:
    """Every stage of ``ref`` checked against ``got``; returns human-readable drifts (empty = parity)."""
    errors = []
    for stage, r in ref.items():
        g = got.get(stage)
        if g is None:
            errors.append(f"{stage}: missing")
            continue
        if isinstance(r, list):  # step counts: exact
            if g != r:
                errors.append(f"{stage}: {g} != {r}")
            continue
        if g["shape"] != r["shape"]:
            errors.append(f"{stage}: shape {g['shape']} != {r['shape']}")
            continue
        if "counts" in r:
            total = int(np.prod(r["shape"])) or 1
            keys = set(r["counts"]) | set(g["counts"])
            diff = sum(abs(g["counts"].get(k, 0) - r["counts"].get(k, 0)) for k in keys) / 2
            if diff > label_slack * total:
                errors.append(f"{stage}: {diff:.0f} of {total} labels moved ({g['counts']} vs {r['counts']})")
            continue
        n = max(1, int(np.prod(r["shape"])))
        scale = r["abs_sum"] / n
        tol = atol * max(scale, 1.0)
        for key in ("sum", "abs_sum"):
            if not np.isclose(g[key], r[key], rtol=rtol, atol=tol * n):
                errors.append(f"{stage}: {key} {g[key]:.6g} != {r[key]:.6g}")
        if not np.allclose(g["samples"], r["samples"], rtol=rtol, atol=tol):
            worst = float(np.max(np.abs(np.subtract(g["samples"], r["samples"]))))
            errors.append(f"{stage}: samples drifted (max {worst:.3g})")
    return errors
