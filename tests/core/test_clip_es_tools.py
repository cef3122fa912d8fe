"""The CLIP-ES offline tools: pseudo-label export and prompt sharpness ranking (tiny random ViT)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_ros.tools import clipes_pseudo_labels as pl
from ovseg_ros.tools import prompt_sharpness as ps


def model_args(checkpoint) -> list[str]:
    return ["--model", "ovseg-tiny-vit", "--checkpoint", str(checkpoint), "--precision", "fp32", "--device", "cpu"]


@pytest.fixture()
def image_dir(tmp_path, rgb_image):
    d = tmp_path / "images"
    d.mkdir()
    Image.fromarray(rgb_image).save(d / "a.png")
    Image.fromarray(rgb_image[::-1].copy()).save(d / "b.jpg")
    return d


def test_dataset_vocabularies_use_authors_prompt_names() -> None:
    voc, names = pl.dataset_vocabulary("voc")
    assert len(voc) == 20 and names[14] == "person"
    assert ",".join(voc.classes[14].names) == "person with clothes,people,human"
    assert voc.classes[2].name == "bird avian"
    coco, cnames = pl.dataset_vocabulary("coco")
    assert len(coco) == 80 and cnames[31] == "snowboard"


def test_tag_resolver_and_annotations(tmp_path) -> None:
    voc, names = pl.dataset_vocabulary("voc")
    resolve = pl.TagResolver(voc, names)
    assert resolve(["person", "14", "tvmonitor", "Bird"], "x") == [14, 19, 2]
    with pytest.raises(ValueError):
        resolve(["unicorn"], "x")
    with pytest.raises(ValueError):
        resolve(["20"], "x")
    xml = tmp_path / "a.xml"
    xml.write_text("<annotation><object><name>dog</name></object><object><name>person</name></object>"
                   "<object><name>dog</name></object></annotation>")
    assert pl.read_voc_annotation(xml) == ["dog", "person"]
    txt = tmp_path / "split.txt"
    txt.write_text("img1 0 25\nimg2 3\n")
    assert pl.read_tags(txt) == {"img1": ["0", "25"], "img2": ["3"]}


def test_pseudo_label_export(image_dir, tmp_path, tiny_vit_checkpoint) -> None:
    tags = tmp_path / "tags.json"
    tags.write_text(json.dumps({"a": ["chair", "person"]}))
    out = tmp_path / "out"
    rc = pl.main([str(image_dir), "-o", str(out), "--classes", "floor", "chair", "person, people",
                  "--tags", str(tags), "--set", "crf_max_side=48", *model_args(tiny_vit_checkpoint)])
    assert rc == 0
    a = Image.open(out / "a.png")
    assert a.mode == "P" and a.size == (80, 60)
    assert set(np.unique(np.asarray(a))) <= {0, 2, 3, 255}  # tags only: chair=2, person=3
    record = json.loads((out / "tags.json").read_text())
    assert record["a"]["tags"] == ["chair", "person"] and not record["a"]["predicted"]
    assert record["b"]["predicted"] and 1 <= len(record["b"]["tags"]) <= 8


def test_dispersion_and_ranking() -> None:
    uniform = torch.full((3, 4), 0.25)
    peaked = torch.tensor([[1.0, 0, 0, 0]] * 3)
    assert ps.sharpness(uniform) == pytest.approx(0.0)
    assert ps.sharpness(peaked) == pytest.approx(3 * (0.1875 / 0.25))
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    imgs = torch.nn.functional.normalize(text[[0, 1, 2, 3, 0]] + 0.05 * torch.randn(5, 16, generator=g), dim=-1)
    blurred = torch.nn.functional.normalize(text + 2.0 * torch.randn(4, 16, generator=g), dim=-1)
    ranking = ps.rank_templates(imgs, {"blurry {}": blurred, "sharp {}": text}, logit_scale=20.0)
    assert [r["template"] for r in ranking] == ["sharp {}", "blurry {}"]
    assert ranking[0]["mean_top1"] > ranking[1]["mean_top1"] and sum(ranking[0]["top1_counts"]) == 5


def test_prompt_sharpness_cli(image_dir, tmp_path, tiny_vit_checkpoint, capsys) -> None:
    out = tmp_path / "rank.json"
    rc = ps.main([str(image_dir), "--classes", "floor", "chair", "--templates", "a clean origami {}.",
                  "a photo of a {}.", "--json", str(out), *model_args(tiny_vit_checkpoint)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {r["template"] for r in data["ranking"]} == {"a clean origami {}.", "a photo of a {}."}
    assert "sharpness" in capsys.readouterr().out
    rc = ps.main([str(image_dir), "--classes", "floor", "chair", "--templates", "a {}", "--pooling", "patch-mean",
                  *model_args(tiny_vit_checkpoint)])
    assert rc == 0
