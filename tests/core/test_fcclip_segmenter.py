"""The FC-CLIP segmenter end to end on a narrow random model: checkpoint loading in the authors' layout,
the registry/preset path, text prompts, thing/stuff flags and a full CPU forward."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ovseg_ros.core.fcclip import convert
from ovseg_ros.core.fcclip.config import FCCLIPArch
from ovseg_ros.core.models import ModelLoadError
from ovseg_ros.core.segmenter import build_segmenter, list_presets, list_segmenters, load_preset, make_config
from ovseg_ros.core.vocabulary import UNLABELED, Vocabulary, VocabularyError

TINY_ARCH = {"hidden_dim": 32, "mask_dim": 32, "num_queries": 12, "dec_layers": 3, "dec_heads": 2, "dec_ffn_dim": 64,
             "enc_layers": 2, "enc_heads": 2, "enc_points": 2, "enc_ffn_dim": 64}
TINY_CLIP = "ovseg-tiny-convnext"


def _tiny_network(seed: int = 1):
    import open_clip

    from ovseg_ros.core.fcclip.model import FCCLIPModel
    from ovseg_ros.core.models import register_model_configs

    register_model_configs()
    torch.manual_seed(seed)
    clip = open_clip.create_model(TINY_CLIP, pretrained=None)
    model = FCCLIPModel(clip, FCCLIPArch(**TINY_ARCH)).eval()
    with torch.no_grad():  # sharper random queries and classes, so the test image gets several segments
        model.decoder.query_feat.weight.mul_(3.0)
        model.decoder.mask_embed.layers[-1].weight.mul_(3.0)
        model.decoder.class_embed.layers[-1].weight.mul_(3.0)
        model.decoder.logit_scale.fill_(4.0)
    return model


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ovseg_ros.core.models import save_random_checkpoint

    folder = tmp_path_factory.mktemp("fcclip")
    model = _tiny_network()
    return {
        "clip": save_random_checkpoint(TINY_CLIP, folder / "tiny_clip.pt", seed=0),
        "no_text": convert.save_authors_checkpoint(model, folder / "fcclip_no_text.pth", include_text_tower=False),
        "full": convert.save_authors_checkpoint(model, folder / "fcclip_full.pth", include_text_tower=True),
        "folder": folder,
    }


def _overrides(weights: dict[str, Path], **extra) -> dict:
    base = {
        "checkpoint": str(weights["no_text"]),
        "model": {"name": TINY_CLIP, "pretrained": "", "checkpoint": str(weights["clip"]), "precision": "fp32"},
        "arch": TINY_ARCH,
        "min_size": 64,
        "max_size": 128,
    }
    base.update(extra)
    return base


@pytest.fixture(scope="module")
def segmenter(weights):
    seg = build_segmenter("fcclip", "realtime", _overrides(weights), device="cpu")
    seg.set_vocabulary(Vocabulary.from_request(["person, people", "wall", "forklift", "chair"]))
    return seg


@pytest.fixture()
def image() -> np.ndarray:
    img = np.random.default_rng(0).integers(0, 255, size=(48, 70, 3), dtype=np.uint8)
    img[10:30, 20:40] = (200, 40, 40)
    return img


# --- registry, presets, loading ---------------------------------------------------------------------------
def test_registered_with_four_presets_of_the_authors_values() -> None:
    from ovseg_ros.core.segmenters.fcclip import FCCLIPConfig

    assert "fcclip" in list_segmenters()
    assert {"coco_panoptic", "ade20k", "cityscapes", "realtime"} <= set(list_presets("fcclip"))
    configs = {p: make_config(FCCLIPConfig, load_preset("fcclip", p)) for p in list_presets("fcclip")}
    for cfg in configs.values():
        assert cfg.arch == FCCLIPArch() and cfg.model.name == "convnext_large_d_320"
        assert (cfg.alpha, cfg.beta, cfg.overlap_threshold) == (0.4, 0.8, 0.8)
    assert (configs["coco_panoptic"].min_size, configs["coco_panoptic"].max_size) == (800, 1333)
    assert (configs["cityscapes"].min_size, configs["cityscapes"].max_size) == (1024, 2560)
    assert configs["realtime"].min_size < 800
    assert FCCLIPArch().num_queries == 250 and FCCLIPArch().dec_layers == 9 and FCCLIPArch().enc_layers == 6


def test_checkpoint_without_text_tower_loads_exactly(segmenter, weights) -> None:
    saved = torch.load(weights["no_text"], weights_only=True)["model"]
    assert "criterion.empty_weight" in saved and not any("token_embedding" in k for k in saved)
    ours = segmenter.network.model.state_dict()
    for key, value in saved.items():
        name = convert.authors_to_ours(key)
        if name is not None:
            assert torch.equal(ours[name], value), key
    clip_text = torch.load(weights["clip"], weights_only=True)
    assert torch.equal(ours["backbone.clip.token_embedding.weight"], clip_text["token_embedding.weight"])
    assert segmenter.predicts_instances and segmenter.name == "fcclip"


def test_complete_checkpoint_needs_no_open_clip_weights(weights) -> None:
    over = _overrides(weights, checkpoint=str(weights["full"]))
    over["model"] = {"name": TINY_CLIP, "pretrained": "", "checkpoint": "", "precision": "fp32"}
    seg = build_segmenter("fcclip", "realtime", over)
    saved = torch.load(weights["full"], weights_only=True)["model"]
    assert torch.equal(seg.network.model.state_dict()["backbone.clip.token_embedding.weight"],
                       saved["backbone.clip_model.token_embedding.weight"])
    assert seg.clip.has_weights and "@fcclip:" in seg.clip.key


def _save_modified(weights, name: str, edit) -> Path:
    obj = torch.load(weights["no_text"], weights_only=True)
    edit(obj["model"])
    path = weights["folder"] / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    "name, edit, needle",
    [
        ("missing.pth", lambda sd: sd.pop("sem_seg_head.predictor.query_feat.weight"), "sem_seg_head.predictor.query_feat.weight"),
        ("shape.pth", lambda sd: sd.__setitem__("void_embedding.weight", torch.zeros(1, 7)), "void_embedding.weight (1, 7)"),
        ("unknown.pth", lambda sd: sd.__setitem__("sem_seg_head.predictor.extra.weight", torch.zeros(2)), "sem_seg_head.predictor.extra.weight"),
        ("visual.pth", lambda sd: sd.pop("backbone.clip_model.visual.trunk.stem.0.weight"), "visual.trunk.stem.0.weight"),
        ("partial_text.pth", lambda sd: sd.__setitem__("backbone.clip_model.ln_final.weight", torch.ones(32)), "text tower"),
    ],
)
def test_bad_checkpoints_are_refused_naming_the_keys(weights, name, edit, needle) -> None:
    path = _save_modified(weights, name, edit)
    with pytest.raises(ModelLoadError) as err:
        build_segmenter("fcclip", "realtime", _overrides(weights, checkpoint=str(path)))
    assert needle in str(err.value)


def test_missing_weights_say_what_to_download(weights) -> None:
    with pytest.raises(ModelLoadError, match="fcclip_cocopan.pth"):
        build_segmenter("fcclip", "realtime", _overrides(weights, checkpoint=""))
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_segmenter("fcclip", "realtime", _overrides(weights, checkpoint=str(weights["folder"] / "nope.pth")))
    over = _overrides(weights)
    over["model"] = {"name": TINY_CLIP, "pretrained": "", "checkpoint": "", "precision": "fp32"}
    with pytest.raises(ModelLoadError, match="no weights given"):  # text tower neither in the file nor given
        build_segmenter("fcclip", "realtime", over)


# --- text -------------------------------------------------------------------------------------------------
def test_prompts_are_14_templates_per_name_and_flags_follow_coco(segmenter) -> None:
    vocab = Vocabulary.from_request(["person, people", "wall", "forklift", "table"], is_thing=[False, True, False, False])
    st = segmenter.encode_vocabulary(vocab)
    prompts = segmenter.describe_prompts(st)
    assert [len(p) for p in prompts] == [28, 14, 14, 14] and prompts[0][0] == "a photo of a person."
    assert st.text.shape[0] == 5 and st.owner.tolist() == [0, 0, 1, 2, 3]
    assert torch.allclose(st.text.norm(dim=-1), torch.ones(5))
    assert st.seen.tolist() == [True, True, False, True]
    assert st.is_thing.tolist() == [False, True, False, False]  # the request's explicit flags win
    guessed = segmenter.encode_vocabulary(Vocabulary.from_request(["person, people", "wall", "forklift", "table"]))
    assert guessed.is_thing.tolist() == [True, False, True, True]  # COCO decides; forklift keeps the name guess
    old = segmenter.config
    try:
        segmenter.config = dataclasses.replace(old, thing_from="vocabulary")
        assert segmenter.encode_vocabulary(vocab).is_thing.tolist() == [False, True, False, False]
    finally:
        segmenter.config = old


def test_text_embedding_is_the_normalised_template_mean(segmenter) -> None:
    from ovseg_ros.core.segmenters.fcclip import VILD_TEMPLATES

    st = segmenter.encode_vocabulary(Vocabulary.from_request(["chair"]))
    clip = segmenter.clip
    tokens = clip.tokenizer([t.format("chair") for t in VILD_TEMPLATES])
    with torch.no_grad():
        e = torch.nn.functional.normalize(clip.model.encode_text(tokens).float(), dim=-1)
    expected = torch.nn.functional.normalize(e.mean(0), dim=-1)
    torch.testing.assert_close(st.text[0], expected, atol=1e-5, rtol=1e-5)


def test_over_long_names_raise_vocabulary_error(segmenter) -> None:
    with pytest.raises(VocabularyError):
        segmenter.encode_vocabulary(Vocabulary.from_request([" ".join(["word"] * 90)]))


# --- full forward -----------------------------------------------------------------------------------------
def test_full_forward_gives_consistent_semantic_and_panoptic(segmenter, image) -> None:
    r = segmenter.segment(image)
    h, w = image.shape[:2]
    assert r.labels.shape == (h, w) and r.labels.dtype == np.int32
    assert r.confidence.shape == (h, w) and r.confidence.dtype == np.float32
    assert set(np.unique(r.labels)) <= {UNLABELED, 0, 1, 2, 3}
    assert 0.0 <= r.confidence.min() and r.confidence.max() <= 1.0
    assert {"preprocess", "backbone", "pixel_decoder", "decoder", "postprocess"} <= set(r.timings)
    pan = r.panoptic
    assert pan is not None and pan.segment_ids.shape == (h, w) and pan.segment_ids.dtype == np.int32
    ids = sorted(s.id for s in pan.segments)
    assert len(ids) >= 2 and ids == list(range(1, len(ids) + 1))
    assert set(np.unique(pan.segment_ids)) <= {0, *ids}
    thing = segmenter.state.is_thing.tolist()
    stuff_classes = [s.class_id for s in pan.segments if not s.is_thing]
    assert len(stuff_classes) == len(set(stuff_classes))  # stuff merged per class
    for s in pan.segments:
        ys, xs = np.nonzero(pan.segment_ids == s.id)
        assert s.area == len(ys) > 0 and 0.0 <= s.score <= 1.0 and s.is_thing == thing[s.class_id]
        assert s.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


def test_forward_equals_direct_model_call(segmenter, image) -> None:
    """The segmenter's semantic labels equal the authors' rule applied to the network's raw outputs."""
    import torch.nn.functional as F

    from ovseg_ros.core.fcclip.preprocess import prepare_image

    st = segmenter.state
    x, (ch, cw) = prepare_image(image, torch.device("cpu"), segmenter.clip.mean, segmenter.clip.std, 64, 128)
    with torch.no_grad():
        out = segmenter.network.model(x, st.text, st.owner, st.seen)
    up = F.interpolate(out.mask_logits, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, :, :ch, :cw]
    up = F.interpolate(up, size=image.shape[:2], mode="bilinear", align_corners=False)[0]
    sem = torch.einsum("qc,qhw->chw", out.class_probs[0, :, :-1], up.sigmoid())
    assert (segmenter.segment(image).labels == sem.argmax(0).numpy()).mean() > 0.999


def test_predict_returns_thing_instances_and_panoptic_semantics(weights, image) -> None:
    seg = build_segmenter("fcclip", "realtime", _overrides(weights, semantic_source="panoptic", instance_topk=20))
    seg.set_vocabulary(Vocabulary.from_request(["person", "wall", "chair"]))
    pred = seg.predict(image)
    inst = pred.instances
    assert inst is not None and inst.masks.shape[1:] == image.shape[:2] and len(inst.scores) <= 20
    assert all(c in (0, 2) for c in inst.class_ids)  # things only
    assert list(inst.scores) == sorted(inst.scores, reverse=True)
    r, pan = pred.result, pred.result.panoptic
    assert ((r.labels == UNLABELED) == (pan.segment_ids == 0)).all()
    for s in pan.segments:
        assert (r.labels[pan.segment_ids == s.id] == s.class_id).all()


def test_random_mode_and_device_moves(weights, image) -> None:
    over = _overrides(weights, checkpoint="", allow_random=True)
    seg = build_segmenter("fcclip", "realtime", over)
    seg.set_vocabulary(Vocabulary.from_request(["cup", "table"]))
    seg.to("cpu")
    seg.backbone_forward(image)
    assert seg.segment(image).labels.shape == image.shape[:2]
    shared = build_segmenter("fcclip", "realtime", {**over, "overlap_threshold": 0.5}, model=seg.network)
    assert shared.network is seg.network


def test_convert_cli_merges_the_text_tower_into_one_file(weights, capsys) -> None:
    merged = weights["folder"] / "fcclip_merged.pth"
    assert convert.main([str(weights["no_text"]), "--out", str(merged), "--text-tower", str(weights["clip"])]) == 0
    assert "training-only" in capsys.readouterr().out
    over = _overrides(weights, checkpoint=str(merged))
    over["model"] = {"name": TINY_CLIP, "pretrained": "", "checkpoint": "", "precision": "fp32"}
    seg = build_segmenter("fcclip", "realtime", over)
    clip_text = torch.load(weights["clip"], weights_only=True)
    assert torch.equal(seg.network.model.state_dict()["backbone.clip.ln_final.weight"], clip_text["ln_final.weight"])


@pytest.mark.parametrize("preset", ["coco_panoptic", "ade20k", "cityscapes", "realtime"])
def test_every_preset_runs_with_the_narrow_model(weights, preset) -> None:
    over = _overrides(weights)
    del over["min_size"], over["max_size"]  # keep the preset's resize rule
    seg = build_segmenter("fcclip", preset, over)
    seg.set_vocabulary(Vocabulary.from_request(["person", "floor"]))
    r = seg.segment(np.zeros((30, 40, 3), dtype=np.uint8))
    assert r.labels.shape == (30, 40) and r.panoptic.segment_ids.shape == (30, 40)
