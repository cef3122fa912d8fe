"""TensorRT options handed to ONNX Runtime, checked on the CPU (no GPU here): the optimisation profile of a
dynamic-size file's inputs, the engine and timing caches, the CUDA device of the node, the refusal of frames
outside the profile and the split of batches larger than it, and the CPU session unchanged beside all this.

GPU-only code paths are tested by what they pass to ONNX Runtime (pure functions, or a recording stand-in for
``InferenceSession``); the CPU execution provider runs the real file.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from ovseg_ros.core import deploy
from ovseg_ros.core.deploy import (
    PROFILE_ASPECTS,
    BackendOptions,
    DeployError,
    TrtProfile,
    attach_onnx,
    derive_trt_profile,
    export_onnx,
    file_trt_profile,
    graph_inputs,
    resolve_providers,
)
from ovseg_ros.core.geometry import short_side_size
from ovseg_ros.core.segmenter import ImageError, build_segmenter
from ovseg_ros.core.vocabulary import Vocabulary

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
IMAGES = [("images", ["batch", 3, "height", "width"])]  # what ovseg-export writes for dense_clip / itaclip


def _resize(short: int, long: int):
    return lambda h, w: short_side_size(h, w, short, long)


def _frames(max_pixels: int, n: int = 400, seed: int = 0) -> list[tuple[int, int]]:
    """Random camera frames of at most ``max_pixels`` pixels, shaped 1:1 to 2:1 either way."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = rng.uniform(1.0, max(PROFILE_ASPECTS))
        short = int(rng.integers(16, int((max_pixels / a) ** 0.5) + 1))
        long = min(int(short * a), max_pixels // short)
        out.append((short, long) if rng.random() < 0.5 else (long, short))
    return out


# --- the profile, a pure function ----------------------------------------------------------------------------
def test_declared_sizes_span_min_to_max_and_opt_is_the_camera() -> None:
    sizes = [(320, 427), (320, 569), (240, 320)]
    fn = _resize(320, 1344)
    p = derive_trt_profile(IMAGES, sizes, fn, 16, batch=1, max_batch=1)
    assert p.shapes["images"] == ((1, 3, 240, 320), (1, 3, 320, 427), (1, 3, 320, 569))  # opt: first declared
    p = derive_trt_profile(IMAGES, sizes, fn, 16, batch=1, max_batch=4, opt_camera=(720, 1280))  # -> 320x569
    assert p.shapes["images"] == ((1, 3, 240, 320), (1, 3, 320, 569), (4, 3, 320, 569))
    # A camera whose graph size is not declared: the first declared is the opt shape.
    assert derive_trt_profile(IMAGES, sizes, fn, 16, opt_camera=(100, 100)).shapes["images"][1] == (1, 3, 320, 427)


def test_provider_option_strings_follow_onnxruntime_format() -> None:
    p = TrtProfile({"images": ((1, 3, 16, 16), (2, 3, 320, 427), (8, 3, 640, 640)),
                    "mask": ((1, 1, 4, 4), (2, 1, 80, 107), (8, 1, 160, 160))})
    assert p.provider_options() == {
        "trt_profile_min_shapes": "images:1x3x16x16,mask:1x1x4x4",
        "trt_profile_opt_shapes": "images:2x3x320x427,mask:2x1x80x107",
        "trt_profile_max_shapes": "images:8x3x640x640,mask:8x1x160x160",
    }


def test_dynamic_file_with_a_short_side_resize_is_bounded_by_the_resize() -> None:
    """dense_clip realtime: short side 320, long side <= 1344. Frames of 1:1..2:1 give long sides <= 640."""
    fn = _resize(320, 1344)
    p = derive_trt_profile(IMAGES, None, fn, 16, batch=1, max_batch=2)
    lo, opt, hi = p.shapes["images"]
    assert lo == (1, 3, 16, 16) and opt == (1, 3, 320, 427) and hi == (2, 3, 640, 640)
    for h, w in _frames(4096 * 4096):  # every admissible frame's graph input lies in the profile
        gh, gw = fn(h, w)
        assert lo[2] <= gh <= hi[2] and lo[3] <= gw <= hi[3], (h, w)
    # The long-side cap binds when it is below 2x the short side.
    assert derive_trt_profile(IMAGES, None, _resize(320, 480), 16).shapes["images"][2] == (1, 3, 480, 480)


def test_dynamic_file_without_a_resize_is_bounded_by_max_image_pixels() -> None:
    px = 480 * 640
    p = derive_trt_profile(IMAGES, None, lambda h, w: (h, w), 14, opt_camera=(480, 640), max_image_pixels=px)
    lo, opt, hi = p.shapes["images"]
    assert lo[2:] == (14, 14) and opt[2:] == (480, 640)
    short = int((px / 2) ** 0.5)
    assert hi[2:] == (px // short, px // short)  # the 2:1 frame of max_image_pixels, either orientation
    for h, w in _frames(px, seed=1):
        assert h <= hi[2] and w <= hi[3]
    # A bigger opt camera than max_image_pixels allows still fits its own profile, in either orientation.
    p = derive_trt_profile(IMAGES, None, lambda h, w: (h, w), 14, opt_camera=(1080, 1920), max_image_pixels=px)
    assert p.shapes["images"][1][2:] == (1080, 1920) and p.shapes["images"][2][2:] == (1920, 1920)


def test_static_inputs_need_no_profile_and_odd_dynamic_inputs_are_refused() -> None:
    fn = _resize(320, 1344)
    assert derive_trt_profile([("images", [1, 3, 480, 640])], None, fn, 32) is None  # FC-CLIP, CLIP-ES, CaR
    # A static dimension keeps its value: dynamic batch only.
    p = derive_trt_profile([("images", ["b", 3, 224, 224])], None, lambda h, w: (224, 224), 16, batch=6, max_batch=6)
    assert p.shapes["images"] == ((1, 3, 224, 224), (6, 3, 224, 224), (6, 3, 224, 224))
    with pytest.raises(DeployError, match="cannot derive a TensorRT profile for graph input 'tokens'"):
        derive_trt_profile([("tokens", ["b", "n"])], None, fn, 16)
    with pytest.raises(DeployError, match="cannot derive"):
        derive_trt_profile([("images", [1, "c", 64, 64])], None, fn, 16)


# --- the provider list -------------------------------------------------------------------------------------
def test_tensorrt_and_cuda_options_carry_profile_caches_and_device(tmp_path) -> None:
    profile = derive_trt_profile(IMAGES, None, _resize(320, 1344), 16)
    opts = BackendOptions("onnxruntime", str(tmp_path / "m.onnx"), providers=("tensorrt", "cuda", "cpu"),
                          trt_cache_dir=str(tmp_path / "cache"), trt_fp16=True, device_id=1)
    trt, cuda, cpu = resolve_providers(opts, ALL, profile)
    assert trt == ("TensorrtExecutionProvider", {
        "device_id": 1, "trt_fp16_enable": True,
        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path / "cache"),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(tmp_path / "cache"),
        "trt_profile_min_shapes": "images:1x3x16x16",
        "trt_profile_opt_shapes": "images:1x3x320x427",
        "trt_profile_max_shapes": "images:1x3x640x640",
    })
    assert cuda == ("CUDAExecutionProvider", {"device_id": 1}) and cpu == "CPUExecutionProvider"
    assert (tmp_path / "cache").is_dir()
    # No profile (static file): no profile keys; default cache folder beside the file.
    (trt2,) = resolve_providers(BackendOptions("onnxruntime", str(tmp_path / "m.onnx"), providers=("tensorrt",)), ALL)
    assert not any(k.startswith("trt_profile") for k in trt2[1])
    assert trt2[1]["trt_engine_cache_path"] == str(tmp_path / "m.onnx.trt_cache")
    # Empty providers: every available one in order (here only the CPU one of this onnxruntime build).
    assert resolve_providers(BackendOptions("onnxruntime", "m.onnx"), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(DeployError, match=r"\['tensorrt', 'cuda'\] not available.*onnxruntime-gpu"):
        resolve_providers(BackendOptions("onnxruntime", "m.onnx", providers=("tensorrt", "cuda", "cpu")),
                          ["CPUExecutionProvider"])


def test_node_and_cli_device_reach_the_gpu_providers() -> None:
    """``device: cuda:1`` -> device_id 1 for TensorRT and CUDA (node parameters and the tools' flags)."""
    import argparse

    from ovseg_ros.ros.params import PARAMS, NodeConfig

    values = {p.name: p.default for p in PARAMS}
    values.update(backend="onnxruntime", onnx_file="/x.onnx", onnx_providers=["tensorrt", "cuda"],
                  trt_opt_size="720x1280", max_image_pixels=1280 * 720, cameras=["front", "rear", "left"])
    cfg = NodeConfig.from_values(values)
    for dev, want in ((torch.device("cuda:1"), 1), (torch.device("cuda:0"), 0), (torch.device("cpu"), 0)):
        opts = cfg.backend_options(dev)
        assert opts.device_id == want
        trt, cuda = resolve_providers(opts, ALL)
        assert trt[1]["device_id"] == cuda[1]["device_id"] == want
    opts = cfg.backend_options(torch.device("cuda:1"))
    assert (opts.trt_opt_size, opts.max_image_pixels, opts.cameras) == ((720, 1280), 1280 * 720, 3)
    ap = argparse.ArgumentParser()
    deploy.add_backend_arguments(ap)
    args = ap.parse_args(["--backend", "onnxruntime", "--onnx-file", "x.onnx", "--trt-opt-size", "720x1280"])
    o = deploy.backend_from_args(args, "cuda:1")
    assert o.device_id == 1 and o.trt_opt_size == (720, 1280)
    with pytest.raises(DeployError, match="trt_opt_size"):
        BackendOptions("onnxruntime", "x.onnx", trt_opt_size=(480,)).check()


def test_trt_opt_size_parameter_is_checked() -> None:
    from ovseg_ros.ros.params import PARAMS

    spec = next(p for p in PARAMS if p.name == "trt_opt_size")
    assert spec.check("", {}) is None and spec.check("480x640", {}) is None
    assert "HEIGHTxWIDTH" in spec.check("480by640", {})
    assert "one HEIGHTxWIDTH" in spec.check("480x640,720x1280", {})


# --- the real file ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense(tiny_model_overrides, tmp_path_factory):
    over = {"short_side": 96, **tiny_model_overrides}
    seg = build_segmenter("dense_clip", "realtime", over, "cpu")
    path = tmp_path_factory.mktemp("trt") / "dense.onnx"
    export_onnx(seg, path, preset="realtime")
    return seg, path, over


def test_profile_of_an_exported_file_reads_its_inputs(dense, tmp_path) -> None:
    seg, path, _ = dense
    inputs, meta = graph_inputs(str(path))
    assert [n for n, _ in inputs] == ["images"] and inputs[0][1][1] == 3
    assert all(not isinstance(d, int) for i, d in enumerate(inputs[0][1]) if i != 1)  # batch, height, width
    assert meta["input_sizes"] == "dynamic" and meta["segmenter"] == "dense_clip"
    graph = seg.image_graph()
    opts = BackendOptions("onnxruntime", str(path), cameras=2, trt_opt_size=(480, 640))
    p = file_trt_profile(str(path), graph, opts)
    # short side 96, long side <= 1344: 2:1 frames reach 192; whole frames: one per camera, 2 cameras.
    assert p.shapes["images"] == ((1, 3, 16, 16), (1, 3, 96, 128), (2, 3, 192, 192))
    assert graph.batches_frames and graph.batch == 1
    with pytest.raises(DeployError, match="onnx cannot read"):
        graph_inputs(str(tmp_path / "missing.onnx"))


def test_graph_batch_sizes_of_the_segmenters(tiny_model_overrides) -> None:
    """The profile's batch range: ITACLIP sends every augmentation (x windows per call) in one batch, dense_clip
    whole frames one per camera (batched across cameras) and sliding windows window_batch crops."""
    ita = build_segmenter("itaclip", "realtime", tiny_model_overrides, "cpu")
    g = ita.image_graph()
    assert g.batch == len(ita.config.augmentations) and not g.batches_frames
    ita_win = build_segmenter("itaclip", "voc21", tiny_model_overrides, "cpu")
    assert ita_win.image_graph().batch == len(ita_win.config.augmentations) * ita_win.config.batch_windows
    win = build_segmenter("dense_clip", "sliding", tiny_model_overrides, "cpu").image_graph()
    assert win.batch == 16 and not win.batches_frames


def test_what_onnxruntime_receives_with_tensorrt_available(dense, monkeypatch) -> None:
    """A stand-in for onnxruntime-gpu's provider list and session records the providers attach_onnx hands over;
    the engine is built at configure (one warm-up run at the profile's opt shape)."""
    import onnxruntime as ort

    seg, path, over = dense
    real_session = ort.InferenceSession
    seen: dict = {}
    runs: list = []

    class Recording:
        def __init__(self, p, sess_options=None, providers=None):
            seen["providers"] = providers
            self._s = real_session(p, sess_options=sess_options, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return [p if isinstance(p, str) else p[0] for p in seen["providers"]]

        def run(self, names, feed):
            runs.append(feed["images"].shape)
            return self._s.run(names, feed)

        def __getattr__(self, name):
            return getattr(self._s, name)

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(ALL))
    monkeypatch.setattr(ort, "InferenceSession", Recording)
    ort_seg = build_segmenter("dense_clip", "realtime", over, "cpu", backend=BackendOptions(
        "onnxruntime", str(path), providers=("tensorrt", "cuda", "cpu"), trt_opt_size=(480, 640), device_id=1))
    trt, cuda, cpu = seen["providers"]
    assert trt[0] == "TensorrtExecutionProvider" and trt[1]["device_id"] == 1 and cuda[1] == {"device_id": 1}
    assert trt[1]["trt_profile_opt_shapes"] == "images:1x3x96x128"
    assert trt[1]["trt_profile_max_shapes"] == "images:1x3x192x192"
    assert runs == [(1, 3, 96, 128)]  # warm-up at configure
    enc = ort_seg.image_encoder
    assert enc.profile is not None and enc.providers[0] == "Tensorrt"
    st = ort_seg.encode_vocabulary(Vocabulary.from_request(["floor", "chair"]))
    img = np.random.default_rng(0).integers(0, 255, (90, 240, 3), dtype=np.uint8)  # 8:3 -> 96x256 > 192
    with pytest.raises(ImageError, match="outside the TensorRT profile.*dim 3: 256 not in \\[16, 192\\]"):
        ort_seg.segment(img, st)
    assert ort_seg.segment(img[:, :160], st).labels.shape == (90, 160)  # 9:16 fits


def test_batches_beyond_the_profile_are_split(dense) -> None:
    seg, path, over = dense
    ort_seg = build_segmenter("dense_clip", "realtime", over, "cpu",
                              backend=BackendOptions("onnxruntime", str(path), providers=("cpu",)))
    enc = ort_seg.image_encoder
    assert enc.profile is None  # CPU provider: no profile, no size checks beyond the declared sizes
    x = torch.randn(5, 3, 64, 80)
    whole = enc(x)[0]
    runs: list = []
    session = enc.session
    enc.session = types.SimpleNamespace(run=lambda n, f: runs.append(f["images"].shape[0]) or session.run(n, f))
    enc.providers = ["Tensorrt", "CPU"]
    enc.profile = TrtProfile({"images": ((1, 3, 16, 16), (1, 3, 64, 80), (2, 3, 96, 96))})
    split = enc(x)[0]
    assert runs == [2, 2, 1]
    assert torch.allclose(whole, split, atol=1e-6)


def test_cpu_session_loads_as_before(dense) -> None:
    """This onnxruntime is the CPU build: with no providers named, the session runs on the CPU provider alone
    (TensorRT and CUDA are not requested, no profile is read); naming TensorRT fails with what to install."""
    import onnxruntime as ort

    seg, path, over = dense
    assert "TensorrtExecutionProvider" not in ort.get_available_providers()
    ort_seg = build_segmenter("dense_clip", "realtime", over, "cpu",
                              backend=BackendOptions("onnxruntime", str(path)))
    assert ort_seg.image_encoder.providers == ["CPU"] and ort_seg.image_encoder.profile is None
    img = np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    vocab = Vocabulary.from_request(["floor", "chair", "door"])
    a = seg.segment(img, seg.encode_vocabulary(vocab)).labels
    b = ort_seg.segment(img, ort_seg.encode_vocabulary(vocab)).labels
    assert float((a == b).mean()) >= 0.999
    with pytest.raises(DeployError, match=r"\['tensorrt'\] not available.*onnxruntime-gpu"):
        attach_onnx(seg, BackendOptions("onnxruntime", str(path), providers=("tensorrt", "cpu")))
