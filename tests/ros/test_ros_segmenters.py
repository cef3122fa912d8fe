"""The real segment_node running each seed segmenter end to end over loopback DDS (tiny random models).

For every method: the node configures with it, publishes labels/panoptic/info for a frame with the input
header, takes a vocabulary change whose revision flows into the next outputs, and answers ``~/query``
(CaR through its referring mode). FC-CLIP's panoptic output comes from its own instances.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from ros_harness import NodeProcess, RosClient, image_array, latched, make_image, publish_until, require_ros_or_skip, same_header, stamp_of

require_ros_or_skip()

from sensor_msgs.msg import Image  # noqa: E402

from ovseg_ros.msg import PanopticSegmentation, SegmentationInfo, Vocabulary  # noqa: E402
from ovseg_ros.srv import Query, SetVocabulary  # noqa: E402

FCCLIP_ARCH = {"hidden_dim": 32, "mask_dim": 32, "num_queries": 12, "dec_layers": 3, "dec_heads": 2,
               "dec_ffn_dim": 64, "enc_layers": 2, "enc_heads": 2, "enc_points": 2, "enc_ffn_dim": 64}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random weights for every method, saved in the formats users provide (open_clip files, FC-CLIP's .pth)."""
    import open_clip
    import torch

    from ovseg_ros.core.fcclip import convert
    from ovseg_ros.core.fcclip.config import FCCLIPArch
    from ovseg_ros.core.fcclip.model import FCCLIPModel
    from ovseg_ros.core.models import register_model_configs, save_random_checkpoint

    folder = tmp_path_factory.mktemp("seg_weights")
    register_model_configs()
    torch.manual_seed(0)
    fc = FCCLIPModel(open_clip.create_model("ovseg-tiny-convnext", pretrained=None), FCCLIPArch(**FCCLIP_ARCH))
    return {
        "vit": save_random_checkpoint("ovseg-tiny-vit", folder / "vit.pt", seed=0),
        "vit_l4": save_random_checkpoint("ovseg-tiny-vit-l4", folder / "vit_l4.pt", seed=1),
        "fcclip": convert.save_authors_checkpoint(fc.eval(), folder / "fcclip_cocopan.pth", include_text_tower=True),
    }


def params_for(segmenter: str, w: dict[str, Path]) -> dict[str, Any]:
    """Node parameters: the method's realtime preset, shrunk so a CPU frame takes well under a second."""
    common = {"segmenter": segmenter, "device": "cpu", "cache_dir": "", "diagnostics_period": 0.5,
              "vocabulary": ["floor", "chair", "person, people"], "max_image_pixels": 100_000}
    if segmenter == "itaclip":
        opts = {"short_side": 64, "slide_crop": 64, "slide_stride": 64, "templates": "photo", "pamr_steps": 1,
                "img_engineering": True}
        return {**common, "model": "ovseg-tiny-vit", "checkpoint": str(w["vit"]), "segmenter_options": json.dumps(opts)}
    if segmenter == "clip_es":
        opts = {"short_side": 64, "crf": False}
        return {**common, "model": "ovseg-tiny-vit", "checkpoint": str(w["vit"]), "segmenter_options": json.dumps(opts)}
    if segmenter == "car":
        opts = {"classifier_model": {"name": "ovseg-tiny-vit-l4", "pretrained": "", "checkpoint": str(w["vit_l4"])},
                "cam_max_side": 64, "prompt_max_side": 64, "classifier_input_size": 56, "crf": False, "max_steps": 2}
        return {**common, "model": "ovseg-tiny-vit", "checkpoint": str(w["vit"]), "segmenter_options": json.dumps(opts)}
    if segmenter == "fcclip":
        opts = {"arch": FCCLIP_ARCH, "min_size": 64, "max_size": 96}
        return {**common, "model": "ovseg-tiny-convnext", "pretrained": "", "checkpoint": str(w["fcclip"]),
                "segmenter_options": json.dumps(opts)}
    raise ValueError(segmenter)


class SegNode:
    def __init__(self, proc: NodeProcess, client: RosClient, namespace: str) -> None:
        self.proc, self.client, self.fqn = proc, client, proc.fqn
        self.image_pub = client.publisher(f"{namespace}/image", Image)
        self.labels = client.subscribe(f"{self.fqn}/semantic/labels", Image)
        self.panoptic = client.subscribe(f"{self.fqn}/panoptic", PanopticSegmentation)
        self.info = client.subscribe(f"{self.fqn}/info", SegmentationInfo)
        self.vocabulary = client.subscribe(f"{self.fqn}/vocabulary", Vocabulary, latched())

    def frame(self, timeout: float = 60.0) -> tuple[Any, Any, Any, Any]:
        """Publish until a labels image comes back; (labels, panoptic, info, source frame) of that frame."""
        hit, sent = publish_until(self.image_pub, lambda i: make_image(), self.labels,
                                  lambda m, sent: any(same_header(m.header, s.header) for s in sent), timeout=timeout)
        assert hit is not None, f"no labels within {timeout} s:\n{self.proc.output()[-3000:]}"
        src = next(s for s in sent if same_header(hit.header, s.header))
        key = stamp_of(src.header)
        pan = self.panoptic.wait_for(lambda m: stamp_of(m.header) == key, timeout)
        info = self.info.wait_for(lambda m: stamp_of(m.header) == key, timeout)
        assert pan is not None and info is not None
        return hit, pan, info, src


@pytest.fixture(scope="module", params=["itaclip", "clip_es", "car", "fcclip"])
def seg_node(request: pytest.FixtureRequest, client: RosClient, namespace: str, weights: dict,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[SegNode]:
    from ovseg_ros.core.segmenter import list_segmenters

    if request.param not in list_segmenters():
        pytest.fail(f"segmenter {request.param} is not registered")
    ns = f"{namespace}_{request.param}"
    proc = NodeProcess(ns, params_for(request.param, weights), tmp_path_factory.mktemp(request.param))
    node = SegNode(proc, client, ns)
    try:
        assert node.vocabulary.wait_for(timeout=180.0) is not None, f"never configured:\n{proc.output()[-4000:]}"
        yield node
    finally:
        code = proc.stop()
        out = proc.output()
        assert "Traceback" not in out, out[-4000:]
        assert code == 0, f"exit code {code}:\n{out[-3000:]}"


def test_node_segments_with_the_method(seg_node: SegNode) -> None:
    vocab = seg_node.vocabulary.wait_for()
    labels, pan, info, src = seg_node.frame()
    assert info.segmenter == vocab.segmenter and info.vocabulary_revision == vocab.revision == pan.vocabulary_revision
    assert (labels.width, labels.height, labels.encoding) == (src.width, src.height, "mono8")
    assert same_header(pan.header, src.header) and same_header(pan.segment_ids.header, src.header)
    lab = image_array(labels)
    names = {c.id: c.name for c in vocab.classes}  # published ids (stable across changes)
    assert set(np.unique(lab).tolist()) <= set(names) | {255}
    ids = image_array(pan.segment_ids)
    assert {s.id for s in pan.segments} == set(np.unique(ids).tolist()) - {0}
    for s in pan.segments:
        assert s.class_name == names[s.class_id] and s.area == int((ids == s.id).sum())
    assert all(len(c.prompts) >= 1 for c in vocab.classes)


def test_vocabulary_change_reaches_the_next_frames(seg_node: SegNode) -> None:
    req = SetVocabulary.Request(classes=["sky", "road", "car, automobile"], is_thing=[False, False, True])
    resp = seg_node.client.call(SetVocabulary, f"{seg_node.fqn}/set_vocabulary", req, timeout=120.0)
    assert resp.success, resp.message
    ids = list(resp.class_ids)  # stable ids (free ids for new names), not positions
    assert len(set(ids)) == 3 and max(ids) < 255
    for _ in range(3):
        labels, pan, info, _src = seg_node.frame()
        if info.vocabulary_revision == resp.revision:
            break
    assert info.vocabulary_revision == pan.vocabulary_revision == resp.revision
    assert set(np.unique(image_array(labels)).tolist()) <= set(ids) | {255}


def test_query_answers_with_the_method(seg_node: SegNode) -> None:
    seg_node.frame()
    req = Query.Request(texts=["a red object", "the green square"])
    resp = seg_node.client.call(Query, f"{seg_node.fqn}/query", req, timeout=120.0)
    assert resp.success, resp.message
    assert len(resp.masks) == len(resp.scores) == 2
    for m in resp.masks:
        assert m.encoding == "mono8" and set(np.unique(image_array(m)).tolist()) <= {0, 255}
    assert all(0.0 <= s <= 1.0 for s in resp.scores)
