from __future__ import annotations

import json

import cv2
import numpy as np

from ovseg_ros import cli


def test_cli_writes_labels_color_and_json(tmp_path, tiny_vit_checkpoint, rgb_image) -> None:
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), cv2.cvtColor(rgb_image, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(src / "b.jpg"), cv2.cvtColor(rgb_image, cv2.COLOR_RGB2BGR))
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    rc = cli.main([str(src), "-o", str(out), "--segmenter", "dense_clip", "--model", "ovseg-tiny-vit",
                   "--pretrained", "", "--checkpoint", str(tiny_vit_checkpoint), "--device", "cpu",
                   "--options", "{short_side: 64}", "--cache-dir", str(tmp_path / "cache"),
                   "--vocabulary", "floor", "chair", "person, people"])
    assert rc == 0
    labels = cv2.imread(str(out / "a_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint8 and labels.shape == (60, 80)
    assert set(np.unique(labels)) <= {0, 1, 2, 255}
    color = cv2.imread(str(out / "a_color.png"))
    assert color.shape == (60, 80, 3)
    meta = json.loads((out / "b.json").read_text())
    assert meta["unlabeled_id"] == 255 and [c["name"] for c in meta["classes"]] == ["floor", "chair", "person"]
    assert meta["classes"][2]["synonyms"] == ["people"]
    assert meta["class_ids"] == "positions" and [c["id"] for c in meta["classes"]] == [0, 1, 2]  # documented


def test_cli_uint16_labels_beyond_255_classes() -> None:
    labels = np.array([[-1, 300]], np.int32)
    enc = cli.encode_labels(labels, 400)
    assert enc.dtype == np.uint16 and enc.tolist() == [[65535, 300]]
    assert cli.encode_labels(np.array([[-1, 3]], np.int32), 4).tolist() == [[255, 3]]


def test_cli_reports_bad_setup_without_traceback(tmp_path, capsys) -> None:
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), np.zeros((8, 8, 3), np.uint8))
    rc = cli.main([str(img), "--checkpoint", str(tmp_path / "missing.pt"), "--model", "ovseg-tiny-vit",
                   "--device", "cpu", "--vocabulary", "a"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = cli.main([str(img), "--vocabulary", "a", "a", "--device", "cpu"])
    assert rc == 2 and "duplicate" in capsys.readouterr().err


def test_cli_lists_segmenters(capsys) -> None:
    assert cli.main(["--list"]) == 0
    assert "dense_clip: presets" in capsys.readouterr().out


def test_cli_referring_queries_with_car(tmp_path, tiny_vit_checkpoint, rgb_image) -> None:
    """The offline tool answers free-form queries (CaR's referring mode): one 0/255 mask per text + scores."""
    from ovseg_ros.core.models import save_random_checkpoint

    cls_ckpt = save_random_checkpoint("ovseg-tiny-vit-l4", tmp_path / "cls.pt", seed=1)
    img = tmp_path / "scene.png"
    cv2.imwrite(str(img), cv2.cvtColor(rgb_image, cv2.COLOR_RGB2BGR))
    options = ("{classifier_model: {name: ovseg-tiny-vit-l4, pretrained: '', checkpoint: '" + str(cls_ckpt) + "'}, "
               "cam_max_side: 64, prompt_max_side: 64, classifier_input_size: 56, crf: false}")
    out = tmp_path / "out"
    rc = cli.main([str(img), "-o", str(out), "--segmenter", "car", "--preset", "refcoco", "--model", "ovseg-tiny-vit",
                   "--pretrained", "", "--checkpoint", str(tiny_vit_checkpoint), "--device", "cpu",
                   "--options", options, "--vocabulary", "unused", "--query", "the green square", "a red wall"])
    assert rc == 0
    meta = json.loads((out / "scene_query.json").read_text())
    assert [q["text"] for q in meta["queries"]] == ["the green square", "a red wall"]
    for q in meta["queries"]:
        mask = cv2.imread(str(out / q["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (60, 80) and set(np.unique(mask)) <= {0, 255}
        assert 0.0 <= q["score"] <= 1.0 and q["area"] == int((mask == 255).sum())
    assert not (out / "scene_labels.png").exists()
