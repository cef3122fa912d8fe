"""ITACLIP end to end with a tiny random ViT saved to disk and loaded back through the checkpoint path.

Geometry is scaled down (short side 96, 64-pixel windows) so the whole file runs in seconds on one core;
the mathematics does not depend on sizes. Recognition quality is not tested (random weights).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from ovseg_ros.core import clip_vit
from ovseg_ros.core.segmenter import build_segmenter, list_segmenters
from ovseg_ros.core.segmenters.itaclip import ITACLIPSegmenter, ITACLIPState, self_self_attention
from ovseg_ros.core.vocabulary import UNLABELED, ClassSpec, Vocabulary, VocabularyError

SMALL = {"templates": "photo", "short_side": 96, "slide_crop": 64, "slide_stride": 32, "batch_windows": 4}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 60, (90, 120, 3), dtype=np.uint8)
    img[20:70, 30:90] += 150
    return img


def build(overrides: dict, preset: str = "voc21", **extra: Any) -> ITACLIPSegmenter:
    small = {**SMALL, "slide_crop": 0} if preset == "realtime" else SMALL  # realtime stays one whole-frame pass
    seg = build_segmenter("itaclip", preset, overrides={**small, **overrides, **extra}, device="cpu")
    assert isinstance(seg, ITACLIPSegmenter)
    return seg


@pytest.fixture(scope="module")
def voc(tiny_model_overrides: dict) -> ITACLIPSegmenter:
    seg = build(tiny_model_overrides)
    seg.set_vocabulary(seg.preset_vocabulary())
    return seg


def test_registered_and_segments_through_build_segmenter(voc: ITACLIPSegmenter, image: np.ndarray) -> None:
    assert "itaclip" in list_segmenters()
    assert voc.intermediate == (6, 7, 9)  # blocks 7, 8, 10 of the 12-block tiny ViT
    result = voc.segment(image)
    k = len(voc.state.vocabulary)
    assert result.labels.shape == image.shape[:2] and result.labels.dtype == np.int32
    assert result.confidence.shape == image.shape[:2] and result.confidence.dtype == np.float32
    assert result.labels.min() >= UNLABELED and result.labels.max() < k
    assert 0.0 <= result.confidence.min() and result.confidence.max() <= 1.0
    assert result.vocabulary is voc.state.vocabulary and result.panoptic is None
    assert {"preprocess", "backbone", "refine", "classify"} <= set(result.timings)
    assert voc.vit_passes(*image.shape[:2]) == 6 * 5  # 2 x 3 windows at 96x128, 5 passes each


@pytest.mark.parametrize("preset", ["realtime", "context60", "coco_object", "coco_stuff", "cityscapes"])
def test_every_preset_runs(preset: str, tiny_model_overrides: dict, image: np.ndarray) -> None:
    seg = build(tiny_model_overrides, preset, short_side=64, slide_stride=64)
    vocab = seg.preset_vocabulary() or Vocabulary.from_request(["floor", "chair", "person, people"])
    result = seg.segment(image, seg.encode_vocabulary(vocab))
    assert result.labels.shape == image.shape[:2] and result.labels.max() < len(vocab)


def test_features_equal_an_explicit_reference(voc: ITACLIPSegmenter) -> None:
    """Independent path: explicit N x N maps from each block's own input, fused 50/50, residual kept, no FFN."""
    visual = voc.clip.visual
    x0 = torch.randn(2, 3, 64, 80)
    with torch.inference_mode():
        ours, grid = voc.dense_features(x0)
        x, grid_ref = clip_vit.embed(visual, x0)
        res = clip_vit.blocks(visual)
        maps = []
        for i in range(len(res) - 1):
            if i in (6, 7, 9):
                q, k, _ = clip_vit.qkv(res[i], x)
                maps.append(self_self_attention(q, k))
            x = res[i](x)
        q, k, v = clip_vit.qkv(res[-1], x)
        fused = 0.5 * self_self_attention(q, k) + 0.5 * torch.stack(maps).mean(0)
        ref = torch.nn.functional.normalize(clip_vit.project_tokens(visual, x + clip_vit.attend(res[-1], fused, v)), dim=-1)
    assert grid == grid_ref == (4, 5)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_batched_equals_unbatched(voc: ITACLIPSegmenter, image: np.ndarray) -> None:
    state = voc.state
    x = voc._prepare(image)
    text = state.text
    with torch.inference_mode():
        batched = voc._logits(x, text)
        saved = voc.config
        voc.config = dataclasses.replace(saved, batch_windows=1)
        try:
            one_by_one = voc._logits(x, text)
        finally:
            voc.config = saved
        # and every augmentation through the ViT on its own, flips undone the authors' way
        crop = x[..., :64, :64]
        passes = [voc.dense_features(a)[0][:, 1:].float() for a in voc.augment(crop).split(1)]
        maps = [torch.einsum("ne,qe->qn", p[0], text).reshape(1, -1, 4, 4) for p in passes]
        up = [torch.nn.functional.interpolate(m, size=(64, 64), mode="bilinear") for m in maps]
        a = voc.config.img_eng_coefficient
        feature = torch.nn.functional.interpolate(sum(maps[:3]) / 3, size=(64, 64), mode="bilinear")
        ref = a * feature + (1 - a) * (up[3].flip(-2) + up[4].flip(-1)) / 2
        torch.testing.assert_close(voc.crop_logits(crop, text), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-6)


def test_text_fusion_background_and_prompts(voc: ITACLIPSegmenter) -> None:
    vocab = Vocabulary((ClassSpec("cat", ("feline", "kitty")), ClassSpec("gizmo", description="a small shiny device"),
                        ClassSpec("zork")))
    st = voc.encode_vocabulary(vocab)
    assert isinstance(st, ITACLIPState)
    assert st.aux_sources == ("file", "request", "none")
    enc, beta = voc.text_encoder, voc.config.def_coefficient
    t = enc.encode_templated(["cat", "feline", "kitty", "gizmo", "zork"], ("a photo of a {}.",))
    a = enc.encode_templated([st.aux_texts[0], "a small shiny device"], ("a photo of a {}.",))
    expected = torch.stack([(1 - beta) * t[0] + beta * a[0], (1 - beta) * t[1] + beta * a[0],
                            (1 - beta) * t[2] + beta * a[0], (1 - beta) * t[3] + beta * a[1], t[4]])
    torch.testing.assert_close(st.text[:5], expected)  # fused rows are not renormalised
    assert st.num_background == 44 and st.text.shape[0] == 5 + 44
    assert st.owner.tolist() == [0, 0, 0, 1, 2] + [3] * 44
    prompts = voc.describe_prompts(st)
    assert prompts[1] == ["a photo of a gizmo.", "a photo of a a small shiny device."]
    assert prompts[2] == ["a photo of a zork."]


def test_background_words_equal_to_a_class_are_dropped(tiny_model_overrides: dict) -> None:
    seg = build(tiny_model_overrides, "realtime")
    st = seg.encode_vocabulary(Vocabulary.from_request(["floor", "Window", "cup"]))
    assert "floor" not in st.background_words and "window" not in st.background_words
    assert "sky" in st.background_words and st.num_background == 42


def test_class_probs_softmax_over_all_names_then_max(voc: ITACLIPSegmenter) -> None:
    vocab = Vocabulary.from_request(["a", "b, b2, b3", "c, c2"])
    owner = torch.tensor([0, 1, 1, 1, 2, 2, 3, 3])  # two background rows
    st = ITACLIPState(vocabulary=vocab, text=torch.zeros(8, 32), owner=owner, num_background=2)
    logits = torch.randn(8, 5, 6)
    probs = voc._class_probs(logits, st)
    soft = torch.softmax(voc.config.logit_scale * logits, dim=0)
    for c in range(4):
        torch.testing.assert_close(probs[c], soft[owner == c].max(dim=0).values)


def test_context_length_errors_are_vocabulary_errors(voc: ITACLIPSegmenter) -> None:
    with pytest.raises(VocabularyError):
        voc.encode_vocabulary(Vocabulary.from_request([" ".join(["word"] * 90)]))
    with pytest.raises(VocabularyError):
        voc.encode_vocabulary(Vocabulary((ClassSpec("thing", description=" ".join(["long"] * 90)),)))


class _Chat:
    def __init__(self, answer: str, status: int = 200) -> None:
        chat = self
        self.calls = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                chat.calls += 1
                body = json.dumps({"choices": [{"message": {"content": answer}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture()
def chat() -> Iterator[_Chat]:
    server = _Chat("a made-up machine part " + "very " * 120 + "long")
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def test_llm_endpoint_fills_missing_definitions(tiny_model_overrides: dict, chat: _Chat, tmp_path) -> None:
    seg = build_segmenter("itaclip", "voc21", device="cpu", cache_dir=str(tmp_path),
                          overrides={**SMALL, **tiny_model_overrides, "llm": {"endpoint": chat.url}})
    st = seg.encode_vocabulary(Vocabulary.from_request(["sprocket", "cat"]))
    assert st.aux_sources == ("llm", "file") and chat.calls == 1  # the file covers 'cat'
    assert st.aux_texts[0].startswith("a made-up machine part very")
    assert seg._fits(st.aux_texts[0], seg._templates())  # trimmed to the CLIP context
    seg.encode_vocabulary(Vocabulary.from_request(["sprocket"]))
    assert chat.calls == 1  # cached


def test_llm_failure_does_not_break_vocabulary_changes(tiny_model_overrides: dict, image: np.ndarray) -> None:
    seg = build(tiny_model_overrides, "realtime", llm={"endpoint": "http://127.0.0.1:9", "timeout_s": 0.5})
    st = seg.encode_vocabulary(Vocabulary.from_request(["sprocket", "widget"]))
    assert st.aux_sources == ("none", "none")
    assert seg.segment(image, st).labels.shape == image.shape[:2]


def test_whole_frame_refine_at_processing_and_backbone(tiny_model_overrides: dict, image: np.ndarray) -> None:
    seg = build(tiny_model_overrides, "realtime", short_side=80)
    st = seg.encode_vocabulary(Vocabulary.from_request(["person", "car", "tree"]))
    assert seg.vit_passes(90, 120) == 1 and seg.processing_size(90, 120) == (80, 107)
    result = seg.segment(image, st)
    assert result.labels.shape == image.shape[:2]
    seg.backbone_forward(image)
    assert seg.to("cpu") is seg
    # a whole-frame pass at 80x107 needs a 5x6 positional grid, cached (in clip_vit) after one call
    from ovseg_ros.core import clip_vit

    seg.segment(image, st)
    assert clip_vit.interpolate_pos_embed(seg.clip.visual, (5, 6)) is clip_vit.interpolate_pos_embed(seg.clip.visual, (5, 6))


def test_query_uses_the_default_implementation(voc: ITACLIPSegmenter, image: np.ndarray) -> None:
    out = voc.query(image, ["red thing", "blue thing"])
    assert len(out.masks) == 2 and all(m.shape == image.shape[:2] for m in out.masks)
