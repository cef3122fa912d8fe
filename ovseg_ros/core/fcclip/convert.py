"""The authors' FC-CLIP checkpoint <-> our module names: the only place that knows both.

The released ``fcclip_cocopan.pth`` (https://github.com/bytedance/fc-clip, README "Model Zoo", Google Drive)
is a detectron2 checkpoint: a dict whose ``'model'`` entry is the state_dict of their ``FCCLIP`` module
(``authors_state_dict.tsv`` beside this file lists its 846 tensors). We map those names onto
:class:`~.model.FCCLIPModel`, drop the training-only ``criterion.empty_weight`` buffer, accept an absent
CLIP text tower (it then comes from open_clip's pretrained weights) and refuse everything else that is
missing, unknown or mis-shaped, naming the keys.

Command line: ``python -m ovseg_ros.core.fcclip.convert CHECKPOINT`` reports what the file holds;
``--out FILE`` re-saves it as a plain tensor dict (``--trust`` for a file that needs full unpickling) and
``--text-tower OPEN_CLIP_WEIGHTS`` adds open_clip's text tower, giving one self-contained file for offline use.
"""

from __future__ import annotations

import argparse
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from ..models import ModelLoadError, check_weights_file

#: Where users get the weights (README of bytedance/fc-clip, ConvNeXt-Large COCO panoptic model).
CHECKPOINT_URL = "https://drive.google.com/file/d/1-91PIns86vyNaL3CzMmDD39zKGnPMtvj/view"
CHECKPOINT_NAME = "fcclip_cocopan.pth"

# (authors' name, our name, index shift authors - ours). {i} is a layer index, {rest} the remaining path.
_RULES: tuple[tuple[str, str, int], ...] = (
    ("backbone.clip_model.{rest}", "backbone.clip.{rest}", 0),
    ("sem_seg_head.pixel_decoder.input_proj.{rest}", "pixel_decoder.input_proj.{rest}", 0),
    ("sem_seg_head.pixel_decoder.transformer.level_embed", "pixel_decoder.level_embed", 0),
    ("sem_seg_head.pixel_decoder.transformer.encoder.layers.{i}.self_attn.{rest}", "pixel_decoder.encoder.{i}.attn.{rest}", 0),
    ("sem_seg_head.pixel_decoder.transformer.encoder.layers.{i}.norm1.{rest}", "pixel_decoder.encoder.{i}.attn_norm.{rest}", 0),
    ("sem_seg_head.pixel_decoder.transformer.encoder.layers.{i}.linear1.{rest}", "pixel_decoder.encoder.{i}.ffn_in.{rest}", 0),
    ("sem_seg_head.pixel_decoder.transformer.encoder.layers.{i}.linear2.{rest}", "pixel_decoder.encoder.{i}.ffn_out.{rest}", 0),
    ("sem_seg_head.pixel_decoder.transformer.encoder.layers.{i}.norm2.{rest}", "pixel_decoder.encoder.{i}.ffn_norm.{rest}", 0),
    ("sem_seg_head.pixel_decoder.adapter_{i}.weight", "pixel_decoder.lateral.{i}.conv.weight", 1),
    ("sem_seg_head.pixel_decoder.adapter_{i}.norm.{rest}", "pixel_decoder.lateral.{i}.norm.{rest}", 1),
    ("sem_seg_head.pixel_decoder.layer_{i}.weight", "pixel_decoder.output.{i}.conv.weight", 1),
    ("sem_seg_head.pixel_decoder.layer_{i}.norm.{rest}", "pixel_decoder.output.{i}.norm.{rest}", 1),
    ("sem_seg_head.pixel_decoder.mask_features.{rest}", "pixel_decoder.mask_proj.{rest}", 0),
    ("sem_seg_head.predictor.transformer_cross_attention_layers.{i}.multihead_attn.{rest}", "decoder.layers.{i}.cross_attn.{rest}", 0),
    ("sem_seg_head.predictor.transformer_cross_attention_layers.{i}.norm.{rest}", "decoder.layers.{i}.cross_norm.{rest}", 0),
    ("sem_seg_head.predictor.transformer_self_attention_layers.{i}.self_attn.{rest}", "decoder.layers.{i}.self_attn.{rest}", 0),
    ("sem_seg_head.predictor.transformer_self_attention_layers.{i}.norm.{rest}", "decoder.layers.{i}.self_norm.{rest}", 0),
    ("sem_seg_head.predictor.transformer_ffn_layers.{i}.linear1.{rest}", "decoder.layers.{i}.ffn_in.{rest}", 0),
    ("sem_seg_head.predictor.transformer_ffn_layers.{i}.linear2.{rest}", "decoder.layers.{i}.ffn_out.{rest}", 0),
    ("sem_seg_head.predictor.transformer_ffn_layers.{i}.norm.{rest}", "decoder.layers.{i}.ffn_norm.{rest}", 0),
    ("sem_seg_head.predictor.decoder_norm.{rest}", "decoder.out_norm.{rest}", 0),
    ("sem_seg_head.predictor.query_feat.{rest}", "decoder.query_feat.{rest}", 0),
    ("sem_seg_head.predictor.query_embed.{rest}", "decoder.query_pos.{rest}", 0),
    ("sem_seg_head.predictor.level_embed.{rest}", "decoder.level_embed.{rest}", 0),
    ("sem_seg_head.predictor.mask_embed.{rest}", "decoder.mask_embed.{rest}", 0),
    ("sem_seg_head.predictor._mask_pooling_proj.{rest}", "decoder.pool_proj.{rest}", 0),
    ("sem_seg_head.predictor.class_embed.{rest}", "decoder.class_embed.{rest}", 0),
    ("sem_seg_head.predictor.logit_scale", "decoder.logit_scale", 0),
    ("void_embedding.{rest}", "void_embedding.{rest}", 0),
)

#: Authors' keys that exist only for training; dropped silently.
TRAINING_ONLY_PREFIXES = ("criterion.",)
#: Size of the training-only buffer in the released model: 133 COCO panoptic classes + void.
_CRITERION_SIZE = 134
_NO_OBJECT_WEIGHT = 0.1


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{rest\}", r"(?P<rest>.+)")
    return re.compile(pattern + r"\Z")


_FORWARD = [(_compile(a), o, s) for a, o, s in _RULES]
_BACKWARD = [(_compile(o), a, -s) for a, o, s in _RULES]


def _rename(key: str, table: list[tuple[re.Pattern[str], str, int]]) -> Optional[str]:
    for pattern, target, shift in table:
        m = pattern.match(key)
        if m:
            groups = m.groupdict()
            if "i" in groups:
                groups["i"] = str(int(groups["i"]) - shift)
            return target.format(**groups)
    return None


def authors_to_ours(key: str) -> Optional[str]:
    """Our name of one of the authors' keys; None if it is not part of the model."""
    return _rename(key, _FORWARD)


def ours_to_authors(key: str) -> Optional[str]:
    return _rename(key, _BACKWARD)


def is_text_tower_key(key: str) -> bool:
    """Our CLIP keys outside the visual tower (token/positional embeddings, transformer, ln_final,
    text_projection, logit_scale): what open_clip's pretrained weights supply when the checkpoint lacks them."""
    return key.startswith("backbone.clip.") and not key.startswith("backbone.clip.visual.")


@dataclass
class LoadReport:
    """What a checkpoint supplied: ``loaded`` keys (ours), ``dropped`` training-only keys (authors'),
    ``text_tower_missing`` keys (ours) left for open_clip's weights."""

    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    text_tower_missing: list[str] = field(default_factory=list)

    @property
    def has_text_tower(self) -> bool:
        return not self.text_tower_missing


def read_checkpoint(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The authors' state_dict (their names) from a detectron2 checkpoint or a bare state_dict file.

    Loads with ``weights_only=True`` (no arbitrary code) unless ``trust``. Raises :class:`ModelLoadError`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"FC-CLIP checkpoint {str(path)!r} does not exist. Download {CHECKPOINT_NAME} from the authors' "
            f"README ({CHECKPOINT_URL}) and pass its path as checkpoint:=/path/to/{CHECKPOINT_NAME}"
        )
    check_weights_file(path, "FC-CLIP checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:  # noqa: BLE001  (UnpicklingError, RuntimeError, EOFError, ... on a hostile file)
        hint = ("" if trust else f"; if you trust the file, re-save it with `python -m {__name__} --trust "
                f"--out SAFE.pth {path}`")
        raise ModelLoadError(f"cannot read FC-CLIP checkpoint {str(path)!r}: {str(exc)[:300]}{hint}") from exc
    state = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise ModelLoadError(f"{str(path)!r} is not a detectron2 checkpoint (a dict with a 'model' state_dict)")
    out = {}
    for k, v in state.items():
        if isinstance(v, np.ndarray):  # detectron2 .pkl-style checkpoints hold numpy arrays
            v = torch.from_numpy(v)
        if isinstance(v, torch.Tensor):
            out[str(k)] = v
    return out


def map_state_dict(authors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(tensors by our names, dropped training-only keys, unknown keys)."""
    mapped, dropped, unknown = {}, [], []
    for key, value in authors.items():
        if key.startswith(TRAINING_ONLY_PREFIXES):
            dropped.append(key)
            continue
        ours = authors_to_ours(key)
        if ours is None:
            unknown.append(key)
        else:
            mapped[ours] = value
    return mapped, dropped, unknown


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_into(model: torch.nn.Module, authors: Mapping[str, torch.Tensor], source: str = "checkpoint") -> LoadReport:
    """Copy the authors' tensors into ``model`` (an FCCLIPModel); strict except for the CLIP text tower.

    Raises:
        ModelLoadError: unknown keys, missing keys outside the text tower, or shape mismatches, all named.
    """
    mapped, dropped, unknown = map_state_dict(authors)
    expected = model.state_dict()
    missing = [k for k in expected if k not in mapped]
    text_missing = [k for k in missing if is_text_tower_key(k)]
    other_missing = [ours_to_authors(k) or k for k in missing if not is_text_tower_key(k)]
    unexpected = [ours_to_authors(k) or k for k in mapped if k not in expected]
    mismatched = [
        f"{ours_to_authors(k)} {tuple(v.shape)} (model {tuple(expected[k].shape)})"
        for k, v in mapped.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    if unknown or unexpected:
        problems.append(f"keys the model does not have: {_listing(unknown + unexpected)}")
    if other_missing:
        problems.append(f"missing keys (only the CLIP text tower may be absent): {_listing(other_missing)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched, 6)}")
    if problems:
        raise ModelLoadError(
            f"{source} does not fit this FC-CLIP architecture - " + "; ".join(problems)
            + ". Check that 'model.name' and 'arch' match the checkpoint (the released one is convnext_large_d_320 "
            "with the default arch)."
        )
    model.load_state_dict(mapped, strict=False)
    return LoadReport(loaded=sorted(mapped), dropped=dropped, text_tower_missing=text_missing)


def to_authors_state_dict(model: torch.nn.Module, include_text_tower: bool = True,
                          include_criterion: bool = True) -> dict[str, torch.Tensor]:
    """``model``'s state_dict under the authors' names (the layout of the released checkpoint)."""
    out = {}
    for k, v in model.state_dict().items():
        if not include_text_tower and is_text_tower_key(k):
            continue
        name = ours_to_authors(k)
        if name is None:
            raise KeyError(f"no authors' name for {k!r}; update _RULES in {__name__}")
        out[name] = v.detach() if v.is_meta else v.detach().cpu()
    if include_criterion:
        weight = torch.ones(_CRITERION_SIZE)
        weight[-1] = _NO_OBJECT_WEIGHT
        out["criterion.empty_weight"] = weight
    return out


def save_authors_checkpoint(model: torch.nn.Module, path: str | Path, include_text_tower: bool = False) -> Path:
    """Save ``model`` as a detectron2-style checkpoint in the authors' layout (tests and conversions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": to_authors_state_dict(model, include_text_tower), "iteration": 0}, path)
    return path


def _text_tower_from_open_clip(path: str) -> dict[str, torch.Tensor]:
    """The non-visual tensors of an open_clip weights file, under the authors' ``backbone.clip_model.`` names."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise ModelLoadError(f"cannot read open_clip weights {path!r}: {str(exc)[:300]}") from exc
    sd = sd.get("state_dict", sd) if isinstance(sd, Mapping) else {}
    out = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if not k.startswith("visual.") and isinstance(v, torch.Tensor):
            out[f"backbone.clip_model.{k}"] = v
    if not out:
        raise ModelLoadError(f"{path!r} holds no open_clip text tower")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Inspect or re-save an FC-CLIP checkpoint (authors' layout).")
    parser.add_argument("checkpoint")
    parser.add_argument("--trust", action="store_true", help="allow full unpickling (only for files you trust)")
    parser.add_argument("--out", default="", help="write a plain {'model': state_dict} copy here")
    parser.add_argument("--text-tower", default="",
                        help="open_clip weights (.bin/.pt/.safetensors) whose text tower is added to --out, "
                             "making a single self-contained file")
    args = parser.parse_args(argv)
    try:
        state = read_checkpoint(args.checkpoint, trust=args.trust)
        if args.text_tower:
            state.update(_text_tower_from_open_clip(args.text_tower))
    except ModelLoadError as exc:
        print(f"error: {exc}")
        return 1
    mapped, dropped, unknown = map_state_dict(state)
    text = [k for k in mapped if is_text_tower_key(k)]
    print(f"{len(state)} tensors: {len(mapped)} mapped ({len(text)} CLIP text tower), {len(dropped)} training-only,"
          f" {len(unknown)} unknown{': ' + _listing(unknown) if unknown else ''}")
    if args.out:
        torch.save({"model": state}, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
