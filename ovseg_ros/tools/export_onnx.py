"""``ovseg-export``: the image encoder of a segmenter to ONNX, for the node's ``backend:=onnxruntime``.

Example::

    ovseg-export --segmenter itaclip --preset realtime --precision fp16 -o ~/models/itaclip_rt_fp16.onnx
    ros2 run ovseg_ros segment_node --ros-args -p segmenter:=itaclip -p backend:=onnxruntime \\
        -p onnx_file:=$HOME/models/itaclip_rt_fp16.onnx -p "onnx_providers:=[tensorrt, cuda, cpu]"

Only the vocabulary-independent image side is exported (text is applied after the graph by the node's own
code), so vocabulary changes never need a new file. The file is checked against the node's model at configure
(segmenter, architecture, SHA-256 of the weights, graph options): export with the same preset, options and
weights the node uses. ``--check`` runs the file on ONNX Runtime's CPU provider and prints its agreement with
the torch backend on a random frame.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ..core.untrusted import load_yaml
from . import plain_help



def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ovseg-export", description=plain_help(__doc__.split("\n\n")[0]),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--segmenter", default="itaclip", help="dense_clip, itaclip, fcclip, clip_es or car")
    p.add_argument("--preset", default="", help="method preset (default: realtime, as the node)")
    p.add_argument("--options", default="", help="YAML/JSON mapping of method options merged onto the preset")
    p.add_argument("--model", default="", help="open_clip architecture (overrides the preset)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (overrides the preset)")
    p.add_argument("--checkpoint", default="", help="local weights file (wins over --pretrained)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="precision inside the graph "
                   "(inputs and outputs are float32 either way)")
    p.add_argument("--sizes", default="", help="camera sizes HEIGHTxWIDTH,... the file is limited to (TensorRT "
                   "builds engines for exactly these); default: any size")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--check", action="store_true", help="compare the file with the torch backend on CPU")
    p.add_argument("--cache-dir", default="~/.cache/ovseg_ros", help="weights cache")
    p.add_argument("--online", action="store_true", help="allow downloading weights from the hub")
    return p.parse_args(argv)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from ..core.segmenter import get_segmenter_class

    overrides: Any = load_yaml(args.options, "--options") if args.options else {}
    if not isinstance(overrides, dict):
        raise ValueError("--options must be a mapping, e.g. '{short_side: 320}'")
    model = {k: v for k, v in (("name", args.model), ("pretrained", args.pretrained),
                               ("checkpoint", args.checkpoint)) if v not in ("", None)}
    model["precision"] = args.precision
    cls = get_segmenter_class(args.segmenter)
    field = cls.primary_model_field
    if field in getattr(cls.config_cls, "__dataclass_fields__", {}):  # color_key has no model
        overrides[field] = {**overrides.get(field, {}), **model}
    return overrides


def check_file(segmenter: Any, path: Path, size: tuple[int, int] = (480, 640)) -> dict[str, float]:
    """Label agreement and largest logit difference of the file (CPU provider) against ``segmenter``."""
    import numpy as np
    import torch

    from ..core.deploy import BackendOptions, attach_onnx
    from ..core.vocabulary import Vocabulary

    vocab = Vocabulary.from_request(["floor", "wall", "chair", "table", "person", "door", "window", "plant"])
    image = np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)
    state = segmenter.encode_vocabulary(vocab)
    ref = segmenter.segment(image, state).labels
    with torch.inference_mode():
        x = segmenter._prepare(image)
        x = x[0] if isinstance(x, tuple) else x
        feats = segmenter.image_graph().module(x)
        feats = feats if isinstance(feats, tuple) else (feats,)
    attach_onnx(segmenter, BackendOptions("onnxruntime", str(path), providers=("cpu",)))
    out = segmenter.image_encoder(x)
    labels = segmenter.segment(image, state).labels
    segmenter.image_encoder = None
    diff = max(float((a.float() - b).abs().max()) for a, b in zip(feats, out))
    return {"label_agreement": float((labels == ref).mean()), "max_output_diff": diff}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from ..core.deploy import DeployError, export_onnx, parse_sizes
    from ..core.models import ModelLoadError
    from ..core.segmenter import auto_preset, build_segmenter

    try:
        preset = args.preset or auto_preset(args.segmenter)
        sizes = parse_sizes(args.sizes)
        t0 = time.perf_counter()
        segmenter = build_segmenter(args.segmenter, preset, _overrides(args), "cpu",
                                    cache_dir=str(Path(args.cache_dir).expanduser()), offline=not args.online)
        if segmenter.image_graph() is None:
            raise DeployError(f"{args.segmenter} has no exportable image encoder; see docs/deploy.md "
                              f"(exportable: dense_clip, itaclip, fcclip, clip_es, car)")
        out = Path(args.output).expanduser()
        meta = export_onnx(segmenter, out, preset=preset, camera_sizes=sizes, opset=args.opset)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f} s")
        shown = {k: meta[k] for k in ("segmenter", "architecture", "precision", "input_sizes", "weights_sha256",
                                      "graph_options", "package_version")}
        print(json.dumps({"preset": preset, **shown}, indent=2))
        if args.check:
            print(json.dumps(check_file(segmenter, out)))
    except (DeployError, ModelLoadError, KeyError, TypeError, ValueError, OSError) as exc:
        print(f"ovseg-export: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
