"""Offline tools on the ROS-free core (run with ``python -m ovseg_ros.tools.<name>``).

* :mod:`.clipes_pseudo_labels` - CLIP-ES pseudo-masks for a folder of images (VOC PNGs, 255 = ignore).
* :mod:`.prompt_sharpness` - rank prompt templates by CLIP-ES's sharpness criterion on your images.
* :mod:`.bag` - ``ovseg-bag``: rosbag2 recordings -> a bag of segment_node's outputs (needs rclpy and the built
  interfaces: its messages are the node's, :mod:`ovseg_ros.ros.offline`); :mod:`.bag_io` reads and writes bags.

The small helpers below are shared by the tools (model arguments, image listing, ``--set`` overrides).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import yaml

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def plain_help(doc: str) -> str:
    """A module docstring (reStructuredText) as plain text for ``--help``: no ``literal`` quotes, no
    ``:role:`` markup, ``Example::`` as ``Example:``."""
    import re

    text = re.sub(r":(?:mod|class|func|meth|data|attr):`~?\.?([^`]+)`", r"\1", doc)
    text = text.replace("``", "").replace("::\n", ":\n")
    return text.strip()


def list_images(inputs: Sequence[str], limit: int = 0) -> list[Path]:
    """Image files given directly or found (non-recursively, sorted) in given folders."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {item}")
    return found[:limit] if limit > 0 else found


def read_rgb(path: Path):
    """(H, W, 3) uint8 RGB of an image file (PIL handles palettes, alpha and greyscale)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy (torch warns on read-only)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help="open_clip architecture (default: the preset's, ViT-B-16-quickgelu)")
    g.add_argument("--pretrained", default=None, help="open_clip pretrained tag (default: the preset's, openai)")
    g.add_argument("--checkpoint", default=None, help="local weights file (wins over --pretrained)")
    g.add_argument("--precision", default=None, choices=("auto", "fp32", "fp16", "bf16"))
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--cache-dir", default="", help="text-embedding and weights cache folder")
    g.add_argument("--online", action="store_true", help="allow downloading weights (default: offline)")


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``model`` mapping of segmenter overrides from :func:`add_model_arguments`' options."""
    model: dict[str, Any] = {}
    if args.model is not None:
        model["name"] = args.model
    if args.pretrained is not None:
        model["pretrained"] = args.pretrained
    if args.checkpoint is not None:
        model["checkpoint"] = args.checkpoint
        model.setdefault("pretrained", "")
    if args.precision is not None:
        model["precision"] = args.precision
    return {"model": model} if model else {}


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs (value parsed as YAML) -> a mapping; dotted keys nest (``model.precision=fp16``)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge, ``b`` wins."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
