"""ONNX export and the ONNX Runtime backend (CPU execution provider): the exported image encoder gives the torch
backend's labels and logits, the vocabulary stays live, and a file that does not match the model is refused.

These run in CI (requirements-deploy.txt installs onnx, onnxruntime and onnxscript): a missing package is a
failure here, not a skip.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ovseg_ros.core.deploy import BackendOptions, DeployError, attach_onnx, export_onnx, parse_sizes
from ovseg_ros.core.segmenter import ImageError, build_segmenter
from ovseg_ros.core.vocabulary import Vocabulary

#: Labels equal to the torch backend on at least this fraction of pixels; logits (fp32) within LOGIT_TOL.
LABEL_AGREEMENT = 0.999
LOGIT_TOL = 1e-4
#: fp16 export: normalised features within this of fp32 torch, labels equal on >= 99 % of pixels.
FP16_FEATURE_TOL = 5e-3
FP16_LABEL_AGREEMENT = 0.99
CPU = ("cpu",)


def _image(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img[: h // 2, : w // 2] = (200, 30, 30)
    img[h // 2:, w // 3:] = (30, 200, 60)
    return img


VOCAB = Vocabulary.from_request(["floor", "chair", "person, people", "door", "table"])
VOCAB2 = Vocabulary.from_request(["cup", "bottle, flask", "wall", "sky", "dog", "cat", "car"])
# Small inputs keep the tiny-model tests fast; itaclip realtime's PAMR and pruning stay on.
CASES = {
    "dense_clip": ("realtime", {"short_side": 96}),
    "itaclip": ("realtime", {"short_side": 96, "background_words": ["sky", "wall"]}),
}


@pytest.fixture(scope="module")
def exported(tiny_model_overrides, tmp_path_factory):
    """Per segmenter: (torch segmenter, fp32 file path, overrides)."""
    out = {}
    folder = tmp_path_factory.mktemp("onnx")
    for name, (preset, opts) in CASES.items():
        over = {**opts, **tiny_model_overrides}
        seg = build_segmenter(name, preset, over, "cpu")
        meta = export_onnx(seg, folder / f"{name}.onnx", preset=preset)
        out[name] = (seg, folder / f"{name}.onnx", over, meta)
    return out


def _ort(name: str, exported, **kw) -> object:
    _, path, over, _ = exported[name]
    preset = CASES[name][0]
    return build_segmenter(name, preset, over, "cpu",
                           backend=BackendOptions("onnxruntime", str(path), providers=CPU, **kw))


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float((a == b).mean())


@pytest.mark.parametrize("name", sorted(CASES))
def test_onnx_backend_equals_torch(name, exported) -> None:
    seg, path, over, meta = exported[name]
    ort_seg = _ort(name, exported)
    assert ort_seg.image_encoder is not None and seg.image_encoder is None
    assert ort_seg.image_encoder.providers == ["CPU"]
    for vocab in (VOCAB, VOCAB2):  # a vocabulary change needs no re-export
        st_t, st_o = seg.encode_vocabulary(vocab), ort_seg.encode_vocabulary(vocab)
        for h, w, s in ((96, 128, 0), (120, 90, 1), (64, 64, 2)):  # dynamic height/width, one file
            img = _image(h, w, s)
            a, b = seg.segment(img, st_t), ort_seg.segment(img, st_o)
            assert _agreement(a.labels, b.labels) >= LABEL_AGREEMENT
            assert np.abs(a.confidence - b.confidence).max() <= 1e-3
            with torch.inference_mode():
                x = seg._prepare(img)
                if name == "dense_clip":
                    la, lb = seg._scores(x, st_t.text), ort_seg._scores(x, st_o.text)
                else:
                    la, lb = seg.crop_logits(x, st_t.text), ort_seg.crop_logits(x, st_o.text)
            assert la.shape == lb.shape
            assert float((la - lb).abs().max()) <= LOGIT_TOL


def test_metadata_records_model_options_and_sizes(exported) -> None:
    _, path, over, meta = exported["itaclip"]
    assert meta["segmenter"] == "itaclip" and meta["architecture"] == "ovseg-tiny-vit"
    assert len(meta["weights_sha256"]) == 64 and len(meta["checkpoint_sha256"]) == 64
    assert meta["input_sizes"] == "dynamic" and meta["precision"] == "fp32" and meta["preset"] == "realtime"
    assert json.loads(meta["graph_options"])["attn_self"] is True
    assert json.loads(meta["options"])["short_side"] == 96
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert props["ovseg.weights_sha256"] == meta["weights_sha256"] and props["ovseg.package_version"]


def test_mismatched_file_is_refused_with_reason(exported, tiny_model_overrides, tmp_path) -> None:
    _, ita_path, _, _ = exported["itaclip"]
    _, dense_path, dense_over, _ = exported["dense_clip"]
    # Another method's file.
    with pytest.raises(DeployError, match="segmenter: file has itaclip, configured dense_clip"):
        build_segmenter("dense_clip", "realtime", dense_over, "cpu",
                        backend=BackendOptions("onnxruntime", str(ita_path), providers=CPU))
    # Other weights (another seed) of the same architecture.
    from ovseg_ros.core.models import save_random_checkpoint

    other = save_random_checkpoint("ovseg-tiny-vit", tmp_path / "other.pt", seed=3)
    over = {**dense_over, "model": {**dense_over["model"], "checkpoint": str(other)}}
    with pytest.raises(DeployError, match="weights_sha256"):
        build_segmenter("dense_clip", "realtime", over, "cpu",
                        backend=BackendOptions("onnxruntime", str(dense_path), providers=CPU))
    # Options that change the graph (ordinary attention instead of self-self).
    _, _, ita_over, _ = exported["itaclip"]
    with pytest.raises(DeployError, match="graph_options"):
        build_segmenter("itaclip", "realtime", {**ita_over, "attn_self": False}, "cpu",
                        backend=BackendOptions("onnxruntime", str(ita_path), providers=CPU))
    # A file that is not an export, and one that does not exist.
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx at all")
    with pytest.raises(DeployError, match="cannot open"):
        build_segmenter("dense_clip", "realtime", dense_over, "cpu",
                        backend=BackendOptions("onnxruntime", str(junk), providers=CPU))
    with pytest.raises(DeployError, match="does not exist: export it with ovseg-export"):
        build_segmenter("dense_clip", "realtime", dense_over, "cpu",
                        backend=BackendOptions("onnxruntime", str(tmp_path / "none.onnx"), providers=CPU))


def test_bad_backend_settings_fail_before_loading(tiny_model_overrides) -> None:
    with pytest.raises(DeployError, match="needs onnx_file"):
        build_segmenter("dense_clip", "realtime", tiny_model_overrides, "cpu", backend=BackendOptions("onnxruntime"))
    with pytest.raises(DeployError, match="backend must be one of"):
        build_segmenter("dense_clip", "realtime", tiny_model_overrides, "cpu", backend=BackendOptions("tensorflow"))
    with pytest.raises(DeployError, match="unknown execution provider"):
        BackendOptions("onnxruntime", "x.onnx", providers=("rocm",)).check()


def test_missing_provider_names_what_to_install(exported) -> None:
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has TensorRT: the refusal cannot be shown here")
    with pytest.raises(DeployError, match=r"\['tensorrt'\] not available.*onnxruntime-gpu"):
        build_segmenter(
            "dense_clip", "realtime", exported["dense_clip"][2], "cpu",
            backend=BackendOptions("onnxruntime", str(exported["dense_clip"][1]), providers=("tensorrt", "cpu")))


def test_methods_without_a_graph_are_refused(tiny_model_overrides, tmp_path) -> None:
    seg = build_segmenter("color_key", "", {}, "cpu")
    with pytest.raises(DeployError, match="cannot run on the onnxruntime backend"):
        attach_onnx(seg, BackendOptions("onnxruntime", str(tmp_path / "x.onnx"), providers=CPU))


def test_declared_sizes_are_enforced(tiny_model_overrides, tmp_path) -> None:
    over = {**CASES["dense_clip"][1], **tiny_model_overrides}
    seg = build_segmenter("dense_clip", "realtime", over, "cpu")
    meta = export_onnx(seg, tmp_path / "sized.onnx", preset="realtime", camera_sizes=parse_sizes("96x128"))
    assert json.loads(meta["input_sizes"]) == [[96, 128]]
    ort_seg = build_segmenter("dense_clip", "realtime", over, "cpu",
                              backend=BackendOptions("onnxruntime", str(tmp_path / "sized.onnx"), providers=CPU))
    st = ort_seg.encode_vocabulary(VOCAB)
    assert ort_seg.segment(_image(96, 128), st).labels.shape == (96, 128)
    with pytest.raises(ImageError, match="exported for input sizes"):
        ort_seg.segment(_image(120, 90), st)
    with pytest.raises(DeployError, match="HEIGHTxWIDTH"):
        parse_sizes("480by640")


def test_gpu_providers_build_engines_at_configure(tiny_model_overrides, tmp_path, monkeypatch) -> None:
    """With a CUDA/TensorRT provider active, every declared size runs once while attaching (engine build at
    configure, not at the first frame); the CPU provider skips it. The provider list is faked on the CPU."""
    import types

    from ovseg_ros.core import deploy

    over = {**CASES["dense_clip"][1], **tiny_model_overrides}
    seg = build_segmenter("dense_clip", "realtime", over, "cpu")
    export_onnx(seg, tmp_path / "sized.onnx", camera_sizes=parse_sizes("96x128,96x192"))
    runs: list[tuple[int, ...]] = []
    real_open = deploy.open_session

    def open_as(providers: list[str]):
        def fake(options, expected=None, threads=0, graph=None):
            enc = real_open(options, expected, threads, graph)
            session = enc.session
            enc.providers = providers
            enc.session = types.SimpleNamespace(
                run=lambda names, feed: runs.append(feed["images"].shape) or session.run(names, feed))
            return enc
        return fake

    opts = BackendOptions("onnxruntime", str(tmp_path / "sized.onnx"), providers=CPU)
    monkeypatch.setattr(deploy, "open_session", open_as(["CPU"]))
    attach_onnx(seg, opts)
    assert runs == []
    monkeypatch.setattr(deploy, "open_session", open_as(["CUDA", "CPU"]))
    attach_onnx(seg, opts)
    assert sorted(runs) == [(1, 3, 96, 128), (1, 3, 96, 192)]


def test_fp16_export_within_bound(tiny_model_overrides, tmp_path) -> None:
    """An fp16 export (weights and activations fp16, float32 in/out) against the fp32 torch backend."""
    over32 = {**CASES["dense_clip"][1], **tiny_model_overrides}
    over16 = {**over32, "model": {**over32["model"], "precision": "fp16"}}
    seg16 = build_segmenter("dense_clip", "realtime", over16, "cpu")
    meta = export_onnx(seg16, tmp_path / "fp16.onnx", preset="realtime")
    assert meta["precision"] == "fp16"
    seg32 = build_segmenter("dense_clip", "realtime", over32, "cpu")
    ort_seg = build_segmenter("dense_clip", "realtime", over32, "cpu",  # fp32 node, fp16 file: same weights
                              backend=BackendOptions("onnxruntime", str(tmp_path / "fp16.onnx"), providers=CPU))
    st32, sto = seg32.encode_vocabulary(VOCAB), ort_seg.encode_vocabulary(VOCAB)
    img = _image()
    with torch.inference_mode():
        x = seg32._prepare(img)
        fa, fb = seg32._features(x), ort_seg._features(x)
    assert fb.dtype == torch.float32
    assert float((fa - fb).abs().max()) <= FP16_FEATURE_TOL
    assert _agreement(seg32.segment(img, st32).labels, ort_seg.segment(img, sto).labels) >= FP16_LABEL_AGREEMENT


def test_vit_b16_architecture_random_weights(tmp_path) -> None:
    """Once on the real ViT-B/16 graph (random weights, one 64x64 input): same logits and labels."""
    over = {"model": {"name": "ViT-B-16-quickgelu", "pretrained": "", "checkpoint": "", "allow_random": True,
                      "precision": "fp32"}, "short_side": 64, "templates": "photo"}
    seg = build_segmenter("dense_clip", "realtime", over, "cpu")
    st = seg.encode_vocabulary(VOCAB)
    img = _image(64, 80)
    with torch.inference_mode():
        x = seg._prepare(img)
        ref_logits = seg._scores(x, st.text)
    ref = seg.segment(img, st)
    export_onnx(seg, tmp_path / "vitb.onnx", preset="realtime")
    attach_onnx(seg, BackendOptions("onnxruntime", str(tmp_path / "vitb.onnx"), providers=CPU))
    with torch.inference_mode():
        logits = seg._scores(x, st.text)
    assert float((logits - ref_logits).abs().max()) <= LOGIT_TOL
    assert _agreement(seg.segment(img, st).labels, ref.labels) >= LABEL_AGREEMENT


def test_export_tool_and_segment_cli_backend(tiny_vit_checkpoint, tmp_path, capsys) -> None:
    """ovseg-export writes a checked file; ovseg-segment --backend onnxruntime gives the torch labels."""
    import cv2

    from ovseg_ros import cli
    from ovseg_ros.tools import export_onnx as tool

    model = ["--model", "ovseg-tiny-vit", "--pretrained", "", "--checkpoint", str(tiny_vit_checkpoint)]
    opts = ["--options", "{short_side: 64, templates: photo}"]
    out = tmp_path / "d.onnx"
    assert tool.main(["--segmenter", "dense_clip", *model, *opts, "-o", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    check = json.loads(printed.strip().splitlines()[-1])
    assert check["label_agreement"] >= LABEL_AGREEMENT and check["max_output_diff"] <= LOGIT_TOL
    assert '"preset": "realtime"' in printed
    img = tmp_path / "in" / "a.png"
    img.parent.mkdir()
    cv2.imwrite(str(img), _image(60, 80))
    common = [str(img.parent), "--segmenter", "dense_clip", "--preset", "realtime", *model, *opts,
              "--precision", "fp32", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--vocabulary", "floor", "chair", "door"]
    assert cli.main([*common, "-o", str(tmp_path / "t")]) == 0
    assert cli.main([*common, "-o", str(tmp_path / "o"), "--backend", "onnxruntime", "--onnx-file", str(out),
                     "--onnx-providers", "cpu"]) == 0
    a = cv2.imread(str(tmp_path / "t" / "a_labels.png"), cv2.IMREAD_UNCHANGED)
    b = cv2.imread(str(tmp_path / "o" / "a_labels.png"), cv2.IMREAD_UNCHANGED)
    assert _agreement(a, b) >= LABEL_AGREEMENT
    # Another model's weights: refused with the reason (exit 2).
    from ovseg_ros.core.models import save_random_checkpoint

    other = save_random_checkpoint("ovseg-tiny-vit", tmp_path / "other.pt", seed=5)
    bad = [a if a != str(tiny_vit_checkpoint) else str(other) for a in common]
    capsys.readouterr()
    assert cli.main([*bad, "-o", str(tmp_path / "x"), "--backend", "onnxruntime", "--onnx-file", str(out)]) == 2
    assert "does not match the configured model" in capsys.readouterr().err
    assert tool.main(["--segmenter", "color_key", "-o", str(tmp_path / "c.onnx")]) == 2
    assert "no exportable image encoder" in capsys.readouterr().err


def test_fcclip_image_part_equals_torch(tmp_path) -> None:
    """FC-CLIP: backbone, pixel decoder and decoder exported (one static size), text head and panoptic
    post-processing in torch: same labels, panoptic ids and class probabilities, across a vocabulary change."""
    from test_fcclip_segmenter import TINY_ARCH, TINY_CLIP, _tiny_network

    from ovseg_ros.core.fcclip import convert

    full = convert.save_authors_checkpoint(_tiny_network(), tmp_path / "fcclip.pth", include_text_tower=True)
    over = {"model": {"name": TINY_CLIP, "pretrained": "", "precision": "fp32"}, "checkpoint": str(full),
            "arch": TINY_ARCH, "min_size": 64, "max_size": 96}
    seg = build_segmenter("fcclip", "realtime", over, "cpu")
    meta = export_onnx(seg, tmp_path / "fc.onnx", preset="realtime", camera_sizes=[(60, 80)])
    assert json.loads(meta["input_sizes"]) == [[64, 96]]  # 64x85 padded to 32
    ort_seg = build_segmenter("fcclip", "realtime", over, "cpu",
                              backend=BackendOptions("onnxruntime", str(tmp_path / "fc.onnx"), providers=CPU))
    img = _image(60, 80)
    for vocab in (VOCAB, VOCAB2):
        st_t, st_o = seg.encode_vocabulary(vocab), ort_seg.encode_vocabulary(vocab)
        a, b = seg.segment(img, st_t), ort_seg.segment(img, st_o)
        assert _agreement(a.labels, b.labels) >= LABEL_AGREEMENT
        assert _agreement(a.panoptic.segment_ids, b.panoptic.segment_ids) >= LABEL_AGREEMENT
        with torch.inference_mode():
            x, _ = seg._prepare(img)
            ref = seg.network.model(x, st_t.text, st_t.owner, st_t.seen)
            masks, emb, clip_emb, valid = ort_seg.image_encoder(x)
            from ovseg_ros.core.fcclip.model import FCCLIPImageOutput

            probs = ort_seg.network.model.classify(FCCLIPImageOutput(masks, emb, clip_emb, valid > 0.5),
                                                   st_o.text, st_o.owner, st_o.seen)
        assert float((ref.mask_logits - masks).abs().max()) <= LOGIT_TOL
        assert float((ref.class_probs - probs).abs().max()) <= LOGIT_TOL
    with pytest.raises(ImageError, match="exported for input sizes"):
        ort_seg.segment(_image(120, 90), st_o)
    with pytest.raises(DeployError, match="one input size per file"):
        export_onnx(seg, tmp_path / "fc2.onnx", camera_sizes=[(60, 80), (120, 90)])


@pytest.fixture(scope="module")
def vit_l4_checkpoint(tmp_path_factory) -> Path:
    from ovseg_ros.core.models import save_random_checkpoint

    return save_random_checkpoint("ovseg-tiny-vit-l4", tmp_path_factory.mktemp("l4") / "vit_l4.pt", seed=1)


@pytest.mark.parametrize("name", ["clip_es", "car"])
def test_cam_methods_run_their_vit_pass_exported(name, tiny_model_overrides, vit_l4_checkpoint, tmp_path) -> None:
    """CLIP-ES and CaR: the ViT pass (blocks, attention maps, image embedding) from the graph, the Grad-CAM's
    last-block backward in torch on its output: same CAM scores and labels, across a vocabulary change."""
    model = tiny_model_overrides["model"]
    if name == "clip_es":
        over = {"model": model, "short_side": 64, "crf": False}
    else:
        over = {"cam_model": model, "classifier_model": {"name": "ovseg-tiny-vit-l4", "pretrained": "",
                                                          "checkpoint": str(vit_l4_checkpoint), "precision": "fp32"},
                "cam_max_side": 64, "prompt_max_side": 64, "classifier_input_size": 56, "crf": False, "max_steps": 2}
    seg = build_segmenter(name, "realtime", over, "cpu")
    img = _image(48, 64)
    meta = export_onnx(seg, tmp_path / f"{name}.onnx", preset="realtime", camera_sizes=[img.shape[:2]])
    assert meta["outputs"] == "block_input,attention,embedding"
    ort_seg = build_segmenter(name, "realtime", over, "cpu",
                              backend=BackendOptions("onnxruntime", str(tmp_path / f"{name}.onnx"), providers=CPU))
    for vocab in (VOCAB, VOCAB2):
        st_t, st_o = seg.encode_vocabulary(vocab), ort_seg.encode_vocabulary(vocab)
        a, b = seg.segment(img, st_t), ort_seg.segment(img, st_o)
        assert _agreement(a.labels, b.labels) >= LABEL_AGREEMENT
        same = a.labels == b.labels  # a pixel at a mask threshold may flip; its confidence then differs
        assert np.abs(a.confidence - b.confidence)[same].max() <= LOGIT_TOL * 10  # CAM min-max scaling amplifies
        if name == "clip_es":
            ma, mb = seg.compute_maps(img, st_t), ort_seg.compute_maps(img, st_o)
            assert ma.present == mb.present
            assert float((ma.image_probs - mb.image_probs).abs().max()) <= LOGIT_TOL
            assert float((ma.probs - mb.probs).abs().max()) <= LOGIT_TOL * 10
