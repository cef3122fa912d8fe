"""Rank prompt templates for CLIP-ES on your own images by the paper's sharpness criterion.

Lin et al., "CLIP is Also an Efficient Segmenter", CVPR 2023 (arXiv 2212.09506), Sec. 3 "sharpness-based
prompt selection": a template whose CLIP classification scores are more peaked over the candidate classes
tends to give better CAMs ('a clean origami {}.' won on VOC). The authors kept no code for it; their advice
(issue linyq2117/CLIP-ES#18) is to classify images with plain CLIP, record the scores and compute Eq. (9).

What we compute, per template: for every image i, the softmax scores s_i over the K classes (temperature
``--logit-scale``, 100 as CLIP), and the index of dispersion var(s_i) / mean(s_i) (population variance);
the sharpness is the sum over images. Higher = sharper. We could not check Eq. (9) against the PDF: if it
is the coefficient of variation instead, note that with a softmax over all K classes mean(s_i) = 1/K for
every template, so var/mean, std/mean and var all rank templates identically (we also print the mean
top-1 probability as a plainer read-out). ``--scores cosine`` computes the same statistic on the raw
cosine similarities instead.

Images are classified as plain CLIP does (``--pooling cls``: 224 resize + centre crop, the CLS embedding)
or with the CLIP-ES image embedding (``--pooling patch-mean``: whole image, mean of the patch tokens).

Example::

    python -m ovseg_ros.tools.prompt_sharpness frames/ --classes pallet "forklift, lift truck" person \\
        --templates "a clean origami {}." "a photo of a {}." "a rendering of a weird {}."
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import add_model_arguments, list_images, read_rgb

#: Candidate templates when none are given: CLIP-ES's winner, its runner-up mentioned in the code, and a few
#: common CLIP templates.
DEFAULT_TEMPLATES = (
    "a clean origami {}.",
    "a rendering of a weird {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a bad photo of a {}.",
    "a sculpture of a {}.",
    "a cropped photo of a {}.",
    "itap of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
)


def dispersion(scores: torch.Tensor) -> torch.Tensor:
    """Index of dispersion per row of (n, K) scores: population variance / mean."""
    s = scores.double()
    return s.var(dim=1, unbiased=False) / s.mean(dim=1).clamp_min(1e-12)


def sharpness(scores: torch.Tensor) -> float:
    """The sharpness of one template: the sum over images of the dispersion of their class scores."""
    return float(dispersion(scores).sum())


def rank_templates(
    image_embeddings: torch.Tensor,
    text_per_template: Mapping[str, torch.Tensor],
    logit_scale: float = 100.0,
    use_softmax: bool = True,
) -> list[dict]:
    """Per template: sharpness, mean top-1 probability, and how often each class is the top-1; best first.

    Args:
        image_embeddings: (n, E) normalised image embeddings.
        text_per_template: template -> (K, E) normalised class embeddings (same class order for all).
    """
    rows = []
    for template, text in text_per_template.items():
        cos = image_embeddings.float() @ text.float().T  # (n, K)
        probs = torch.softmax(logit_scale * cos, dim=1)
        scores = probs if use_softmax else cos
        rows.append({
            "template": template,
            "sharpness": sharpness(scores),
            "mean_top1": float(probs.max(dim=1).values.mean()),
            "top1_counts": torch.bincount(probs.argmax(dim=1), minlength=text.shape[0]).tolist(),
        })
    rows.sort(key=lambda r: r["sharpness"], reverse=True)
    return rows


def _cls_embeddings(clip, images: Sequence[np.ndarray], size: int = 224) -> torch.Tensor:
    """Plain CLIP classification input: resize the short side to ``size`` (bicubic), centre crop, CLS embedding."""
    from ..core.geometry import image_to_tensor, normalize, short_side_size

    mean, std = clip.pixel_stats()
    out = []
    for img in images:
        x = image_to_tensor(img, clip.device)
        h, w = short_side_size(img.shape[0], img.shape[1], size)
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (h - size) // 2, (w - size) // 2
        x = normalize(x[:, :, top:top + size, left:left + size], mean, std).to(clip.dtype)
        with torch.inference_mode():
            out.append(F.normalize(clip.model.encode_image(x).float(), dim=-1))
    return torch.cat(out)


def _patch_mean_embeddings(clip, images: Sequence[np.ndarray], max_side: int) -> torch.Tensor:
    from ..core.cam import ClipCam, prepare_image

    cam = ClipCam(clip)
    return torch.cat([cam.encode(prepare_image(clip, img, 0, max_side), with_attention=False).embedding
                      for img in images])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovseg_ros.tools.prompt_sharpness",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files or folders (unlabelled images of your domain)")
    v = p.add_argument_group("classes (one of)")
    v.add_argument("--dataset", choices=("voc", "coco"), help="built-in VOC/COCO classes (authors' prompt names)")
    v.add_argument("--vocabulary", help="vocabulary YAML file")
    v.add_argument("--classes", nargs="+", help='class entries, "name, synonym, ..."')
    p.add_argument("--templates", nargs="+", default=None, help="candidate templates with {} (default: a built-in set)")
    p.add_argument("--templates-file", help="file with one template per line")
    p.add_argument("--synonyms", choices=("join", "mean"), default="join",
                   help="join names into one prompt (CLIP-ES) or average per-name embeddings")
    p.add_argument("--pooling", choices=("cls", "patch-mean"), default="cls")
    p.add_argument("--max-side", type=int, default=448, help="long-side cap for --pooling patch-mean")
    p.add_argument("--scores", choices=("softmax", "cosine"), default="softmax")
    p.add_argument("--logit-scale", type=float, default=100.0)
    p.add_argument("--limit", type=int, default=0, help="use at most this many images")
    p.add_argument("--json", help="also write the ranking to this JSON file")
    add_model_arguments(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..core.models import ModelSpec, load_clip, resolve_device
    from ..core.text import TextEncoder
    from ..core.vocabulary import Vocabulary, load_vocabulary_file
    from .clipes_pseudo_labels import dataset_vocabulary

    if sum(x is not None for x in (args.dataset, args.vocabulary, args.classes)) != 1:
        print("error: give exactly one of --dataset, --vocabulary, --classes", file=sys.stderr)
        return 2
    if args.dataset:
        vocabulary, _ = dataset_vocabulary(args.dataset)
    elif args.vocabulary:
        vocabulary = load_vocabulary_file(args.vocabulary)
    else:
        vocabulary = Vocabulary.from_request(args.classes, source="cli")
    templates = list(args.templates or ())
    if args.templates_file:
        templates += [t.strip() for t in Path(args.templates_file).read_text().splitlines() if t.strip()]
    templates = templates or list(DEFAULT_TEMPLATES)
    bad = [t for t in templates if "{}" not in t]
    if bad:
        print(f"error: templates need a '{{}}' placeholder: {bad}", file=sys.stderr)
        return 2
    spec = ModelSpec(name=args.model or "ViT-B-16-quickgelu",
                     pretrained=("" if args.checkpoint and args.pretrained is None else (args.pretrained or "openai")),
                     checkpoint=args.checkpoint or "", precision=args.precision or "auto")
    clip = load_clip(spec, resolve_device(args.device), cache_dir=args.cache_dir or None, offline=not args.online)
    encoder = TextEncoder(clip, args.cache_dir)
    paths = list_images(args.images, args.limit)
    if not paths:
        print("error: no images found", file=sys.stderr)
        return 2
    images = [read_rgb(p) for p in paths]
    if args.pooling == "cls":
        emb = _cls_embeddings(clip, images)
    else:
        emb = _patch_mean_embeddings(clip, images, args.max_side)
    text = {}
    for t in templates:
        rows = []
        for c in vocabulary.classes:
            prompts = [t.format(",".join(c.names))] if args.synonyms == "join" else [t.format(n) for n in c.names]
            rows.append(F.normalize(encoder.encode_group(prompts).mean(dim=0), dim=-1))
        text[t] = torch.stack(rows)
    ranking = rank_templates(emb, text, args.logit_scale, use_softmax=args.scores == "softmax")
    width = max(len(r["template"]) for r in ranking)
    print(f"{len(images)} images, {len(vocabulary)} classes, scores={args.scores}, pooling={args.pooling}")
    print(f"{'rank':>4}  {'template':<{width}}  {'sharpness':>10}  {'mean top-1':>10}")
    for i, r in enumerate(ranking, 1):
        print(f"{i:>4}  {r['template']:<{width}}  {r['sharpness']:>10.4f}  {r['mean_top1']:>10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"classes": vocabulary.names, "ranking": ranking}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
