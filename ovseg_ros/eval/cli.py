"""``ovseg-eval``: score a segmenter preset on a dataset, as the papers do, on one process or many.

Examples::

    ovseg-eval --segmenter itaclip --preset voc21 --dataset voc --root /data/VOCdevkit/VOC2012
    ovseg-eval --segmenter fcclip --preset coco_panoptic --dataset coco_panoptic --root /data/coco \\
        --checkpoint fcclip_cocopan.pth --limit 50
    torchrun --nproc_per_node=4 -m ovseg_ros.eval --segmenter car --preset voc --dataset voc --root ...

Writes ``<output>/report.json`` (everything, with the run's fingerprint), ``report.md`` and per-image
records (``records/``); ``--save-predictions`` adds the predicted label (and panoptic) PNGs. A rerun with
the same fingerprint (weights, resolved configuration, package version, dataset) continues where the last
one stopped; a rerun with another one is refused with the differences (``--overwrite`` starts afresh).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ..core.models import ModelLoadError
from ..core.segmenter import (
    ImageError,
    build_segmenter,
    get_segmenter_class,
    list_presets,
    list_segmenters,
    load_paper_results,
)
from ..core.deploy import add_backend_arguments, backend_from_args
from ..core.vocabulary import VocabularyError
from . import distributed as dist
from .datasets import READERS, DatasetError, open_dataset
from .report import build_report, headline_text, write_report
from .fingerprint import fingerprint
from .runner import RunMismatchError, prepare_output, run_evaluation
from ..tools import plain_help


def default_preset(segmenter: str, dataset: str) -> str:
    """The preset whose published numbers are on ``dataset``, else ``realtime``."""
    for preset in list_presets(segmenter):
        if any(e.get("dataset") == dataset for e in load_paper_results(segmenter, preset)):
            return preset
    return "realtime" if "realtime" in list_presets(segmenter) else ""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ovseg-eval", description=plain_help(__doc__),
                                epilog="Dataset layouts: python -m ovseg_ros.eval --layouts",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--segmenter", help="segmentation method (--list shows them and their presets)")
    p.add_argument("--preset", default="", help="method preset (default: the one published on --dataset, else realtime)")
    p.add_argument("--dataset", choices=sorted(READERS), help="dataset layout")
    p.add_argument("--root", help="dataset folder")
    p.add_argument("-o", "--output", default="", help="output folder (default: eval_out/<segmenter>-<preset>-<dataset>)")
    p.add_argument("--limit", type=int, default=0, help="only the first N images (a rerun with more continues)")
    p.add_argument("--overwrite", action="store_true", help="drop earlier per-image records in --output")
    p.add_argument("--model", default="", help="open_clip architecture (overrides the preset)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (overrides the preset)")
    p.add_argument("--checkpoint", default="", help="local weights file (wins over --pretrained)")
    p.add_argument("--precision", default="", choices=["", "auto", "fp32", "fp16", "bf16"])
    p.add_argument("--options", default="", help="YAML mapping of method options merged onto the preset")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when GPUs exist), cpu, cuda:N")
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"], help="torch.distributed backend")
    p.add_argument("--cache-dir", default="~/.cache/ovseg_ros", help="text-embedding and weights cache")
    p.add_argument("--online", action="store_true", help="allow downloading weights from the hub")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    _add_output_args(p)
    p.add_argument("--list", action="store_true", help="list segmenters, presets and published numbers")
    p.add_argument("--layouts", action="store_true", help="print the expected folder layout of every dataset")
    p.add_argument("-v", "--verbose", action="store_true")
    add_backend_arguments(p, "--image-backend")  # --backend is torch.distributed's
    return p.parse_args(argv)


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save-predictions", action="store_true",
                   help="also write each prediction as PNGs in the dataset's own label values "
                        "(<output>/predictions/, see docs/evaluation.md)")
    p.add_argument("--class-file", default="", metavar="PATH",
                   help="ask the classes with a published class list ('<id>:<name>,<synonym>,...' lines, e.g. "
                        "FC-CLIP's <dataset>_with_prompt_eng.txt; see docs/methods/fcclip.md)")
    p.add_argument("--log-every", type=int, default=50, metavar="N",
                   help="when stderr is not a terminal: one progress line every N images (default 50)")


def _apply_class_file(dataset: Any, args: argparse.Namespace, preset: str) -> None:
    """``--class-file``: the dataset is asked with that list (its hash joins the fingerprint)."""
    from .class_file import class_file_vocabulary

    if args.class_file:
        dataset.vocabulary = class_file_vocabulary(args.class_file, dataset)
        dataset._extra.setdefault("identity_files", {})["class_file"] = str(Path(args.class_file).resolve())
    elif args.segmenter == "fcclip" and preset != "realtime":
        print("ovseg-eval: note: FC-CLIP's paper numbers use the authors' class lists; without --class-file "
              "the project's vocabulary is asked (docs/methods/fcclip.md says where to get theirs)", file=sys.stderr)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: Any = yaml.safe_load(args.options) if args.options else {}
    if not isinstance(overrides, dict):
        raise ValueError("--options must be a YAML mapping, e.g. '{short_side: 224}'")
    # --pretrained '' is meaningful (no tag: weights from --checkpoint only), so only None means "not given".
    model = {k: v for k, v in (("name", args.model), ("pretrained", args.pretrained),
                               ("checkpoint", args.checkpoint), ("precision", args.precision))
             if v is not None and (v != "" or k == "pretrained")}
    if model:
        field = get_segmenter_class(args.segmenter).primary_model_field
        overrides[field] = {**overrides.get(field, {}), **model}
    return overrides


def _list() -> None:
    for name in list_segmenters():
        print(f"{name}:")
        for preset in list_presets(name):
            paper = load_paper_results(name, preset)
            text = ", ".join(f"{e['dataset']} {e['metric']} {e['value']}" + ("" if e.get("verified") else " (unverified)")
                             for e in paper)
            print(f"  {preset}" + (f"  [paper: {text}]" if text else ""))


def _layouts() -> None:
    from . import datasets

    doc = datasets.__doc__ or ""
    start = doc.index("=" * 17)
    print(doc[start:doc.index("\n\n", start)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.list:
        _list()
        return 0
    if args.layouts:
        _layouts()
        return 0
    missing = [f"--{n}" for n in ("segmenter", "dataset", "root") if not getattr(args, n)]
    if missing:
        print(f"ovseg-eval: give {', '.join(missing)} (or --list / --layouts)", file=sys.stderr)
        return 2
    ctx = dist.DistContext()
    try:
        ctx, device = dist.init(args.device, args.backend)
        if args.segmenter not in list_segmenters():
            raise KeyError(f"unknown segmenter {args.segmenter!r}; available: {', '.join(list_segmenters())}")
        dataset = open_dataset(args.dataset, args.root)
        preset = args.preset or default_preset(args.segmenter, args.dataset)
        _apply_class_file(dataset, args, preset)
        overrides = _overrides(args)
        out_dir = Path(args.output or f"eval_out/{args.segmenter}-{preset or 'default'}-{args.dataset}")
        segmenter = build_segmenter(args.segmenter, preset, overrides, device,
                                    cache_dir=str(Path(args.cache_dir).expanduser()), offline=not args.online,
                                    backend=backend_from_args(args, device))
        spec = getattr(segmenter.config, get_segmenter_class(args.segmenter).primary_model_field, None)
        cache_dir = str(Path(args.cache_dir).expanduser())
        run = {"segmenter": args.segmenter, "preset": preset, "overrides": overrides, "dataset": dataset.name,
               "root": str(Path(args.root).resolve()), "num_classes": dataset.num_classes,
               "model": getattr(spec, "name", ""),
               # the checkpoint wins over the tag (ModelSpec), so a tag beside a checkpoint was not used
               "pretrained": "" if getattr(spec, "checkpoint", "") else getattr(spec, "pretrained", ""),
               "checkpoint": getattr(spec, "checkpoint", ""), "device": str(device),
               "world_size": ctx.world_size, "backend": ctx.backend, "limit": args.limit,
               "fingerprint": fingerprint(args.segmenter, preset, segmenter.config, dataset, cache_dir)}
        if args.image_backend != "torch":  # recorded only when used: earlier runs' records stay comparable
            run.update(image_backend=args.image_backend, onnx_file=str(Path(args.onnx_file).resolve()))
        prepare_output(out_dir, run, ctx, args.overwrite)
        totals = run_evaluation(segmenter, dataset, out_dir, ctx, args.limit, progress=not args.no_progress,
                                save_predictions=args.save_predictions, log_every=args.log_every)
        if ctx.is_main:
            report = build_report(totals, dataset, run, load_paper_results(args.segmenter, preset))
            json_path, md_path = write_report(report, out_dir)
            print(headline_text(report))
            print(f"report: {md_path} (everything in {json_path})")
        dist.barrier(ctx)
        return 0
    except (DatasetError, RunMismatchError, ModelLoadError, VocabularyError, ImageError, KeyError, TypeError,
            ValueError, RuntimeError) as exc:
        print(f"ovseg-eval: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ovseg-eval: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    finally:
        dist.finish(ctx)


if __name__ == "__main__":
    sys.exit(main())
