"""ovseg-eval's reproducibility: the fingerprint guards resumes, torn records, saved predictions that re-score
to the same numbers, panopticapi's crowd rule, honest paper figures, dataset class names, plain progress."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from eval_helpers import OracleSegmenter, write_coco_panoptic, write_folder_classes, write_semantic
from PIL import Image

from ovseg_ros.eval import distributed as dist
from ovseg_ros.eval.cli import main as eval_main
from ovseg_ros.eval.datasets import open_dataset
from ovseg_ros.eval.panoptic import FP, SegmentInfo, pq_image_stats
from ovseg_ros.eval.report import build_report, headline_text
from ovseg_ros.eval.runner import RECORDS, prepare_output, run_evaluation

CTX = dist.DistContext()


def _tiny_args(root: Path, out: Path, checkpoint: Path, cache: Path, *extra: str) -> list[str]:
    return ["--segmenter", "dense_clip", "--preset", "realtime", "--dataset", "folder", "--root", str(root),
            "-o", str(out), "--model", "ovseg-tiny-vit", "--pretrained", "", "--checkpoint", str(checkpoint),
            "--device", "cpu", "--options", "{short_side: 32}", "--cache-dir", str(cache), "--no-progress", *extra]


@pytest.fixture()
def folder_data(tmp_path, tiny_vit_checkpoint) -> tuple[Path, Path]:
    root = tmp_path / "mine"
    write_folder_classes(root, ["floor", "chair", "person"])
    write_semantic("folder", root, [0, 1, 2, 255], n=4)
    ckpt = tmp_path / "w" / "model.pt"  # our own copy: the test replaces it in place
    ckpt.parent.mkdir()
    shutil.copy(tiny_vit_checkpoint, ckpt)
    return root, ckpt


def test_fingerprint_recorded_and_a_changed_checkpoint_refused(tmp_path, folder_data, capsys) -> None:
    from ovseg_ros import __version__
    from ovseg_ros.core.models import save_random_checkpoint

    root, ckpt = folder_data
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert eval_main(_tiny_args(root, out, ckpt, cache, "--limit", "2")) == 0
    report = json.loads((out / "report.json").read_text())
    fp = report["fingerprint"]
    assert fp == report["run"]["fingerprint"] == json.loads((out / "run.json").read_text())["fingerprint"]
    assert fp["weights"]["model.checkpoint"] == "sha256:" + hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert fp["package"] == __version__ and fp["segmenter"] == "dense_clip" and fp["preset"] == "realtime"
    assert fp["config"]["short_side"] == 32 and fp["config"]["model"]["name"] == "ovseg-tiny-vit"
    assert fp["dataset"]["classes"] == ["floor", "chair", "person"] and fp["dataset"]["images"] == 4
    assert len(fp["dataset"]["samples_sha256"]) == 64
    assert report["run"]["pretrained"] == "" and report["run"]["checkpoint"] == str(ckpt)
    assert "## Fingerprint" in (out / "report.md").read_text()

    # Other weights at the same path: the 2 records must not be reused (the 1.03 vs 0.83 mix).
    save_random_checkpoint("ovseg-tiny-vit", ckpt, seed=1)
    capsys.readouterr()
    assert eval_main(_tiny_args(root, out, ckpt, cache)) == 2
    err = capsys.readouterr().err
    assert "weights.model.checkpoint: sha256:" in err and "--overwrite" in err and "Traceback" not in err
    # An option changed: named in the refusal too.
    assert eval_main(_tiny_args(root, out, ckpt, cache, "--options", "{short_side: 48}")) == 2
    assert "config.short_side: 32 -> 48" in capsys.readouterr().err
    # --overwrite starts afresh: all 4 images segmented with the new weights.
    assert eval_main(_tiny_args(root, out, ckpt, cache, "--overwrite")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["speed"]["images_this_run"] == 4
    assert report["fingerprint"]["weights"]["model.checkpoint"].endswith(hashlib.sha256(ckpt.read_bytes()).hexdigest())


def test_a_changed_dataset_is_refused(tmp_path, folder_data, capsys) -> None:
    root, ckpt = folder_data
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert eval_main(_tiny_args(root, out, ckpt, cache, "--limit", "1")) == 0
    lab = root / "labels" / "img03.png"
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(lab)  # another annotation file (another size)
    capsys.readouterr()
    assert eval_main(_tiny_args(root, out, ckpt, cache)) == 2
    assert "dataset.samples_sha256" in capsys.readouterr().err


def test_torn_record_line_is_redone_once(tmp_path) -> None:
    raw = write_semantic("folder", tmp_path / "d", [0, 1, 2], n=3)
    write_folder_classes(tmp_path / "d", ["a", "b", "c"])
    ds = open_dataset("folder", tmp_path / "d")
    oracle = OracleSegmenter({shape: lab for shape, lab in raw.items()})
    out = tmp_path / "out"
    run = {"segmenter": "oracle", "fingerprint": {"x": 1}}
    prepare_output(out, run, CTX, overwrite=False)
    run_evaluation(oracle, ds, out, CTX, progress=False)
    path = out / RECORDS / f"{CTX.tag}.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])  # a crash mid-write
    oracle.calls = 0
    totals = run_evaluation(oracle, ds, out, CTX, progress=False)
    assert oracle.calls == 1 and totals.new_images == 1 and len(totals.images) == 3
    # The new record is on a line of its own (not glued to the cut one), so a third run does nothing.
    oracle.calls = 0
    totals = run_evaluation(oracle, ds, out, CTX, progress=False)
    assert oracle.calls == 0 and len(totals.images) == 3
    assert sum(1 for ln in path.read_text().splitlines() if ln.endswith("}")) == 3


def test_crowd_rule_last_in_json_order_wins() -> None:
    """panopticapi (pq_compute_single_core) keeps, per class, the crowd segment listed LAST in segments_info."""
    gt = np.zeros((4, 8), np.int64)
    gt[:, 0:4] = 9  # crowd of class 0, listed first, higher id
    gt[:, 4:8] = 3  # crowd of class 0, listed last, lower id
    pred = np.zeros((4, 8), np.int64)
    pred[:, 4:8] = 1  # a prediction of class 0 lying on the last-listed crowd (id 3)
    pred_segs = {1: SegmentInfo(0)}
    last_is_3 = {9: SegmentInfo(0, True), 3: SegmentInfo(0, True)}
    last_is_9 = {3: SegmentInfo(0, True), 9: SegmentInfo(0, True)}
    assert pq_image_stats(gt, last_is_3, pred, pred_segs, 1)[0, FP] == 0  # on the crowd region: ignored
    assert pq_image_stats(gt, last_is_9, pred, pred_segs, 1)[0, FP] == 1  # crowd 9 counts; this one is an FP


def test_save_predictions_rescore_with_numpy(tmp_path, folder_data) -> None:
    """The closing-note check: saved label PNGs re-scored with a few lines of numpy give the report's mIoU."""
    root, ckpt = folder_data
    out = tmp_path / "out"
    assert eval_main(_tiny_args(root, out, ckpt, tmp_path / "cache", "--save-predictions")) == 0
    report = json.loads((out / "report.json").read_text())
    meta = json.loads((out / "predictions" / "meta.json").read_text())
    assert meta["no_class"] == 255 and [c["value"] for c in meta["classes"]] == [0, 1, 2]
    k = 3
    cm = np.zeros((k, k + 1), np.int64)  # rows: truth, columns: prediction + "no class"
    for lab in sorted((root / "labels").glob("*.png")):
        gt = np.array(Image.open(lab)).astype(np.int64)
        pr = np.array(Image.open(out / "predictions" / "semantic" / lab.name)).astype(np.int64)
        keep = gt != 255
        np.add.at(cm, (gt[keep], np.where(pr[keep] == 255, k, pr[keep])), 1)
    tp = np.diag(cm[:, :k])
    union = cm.sum(1) + cm[:, :k].sum(0) - tp
    miou = (tp[union > 0] / union[union > 0]).mean()
    assert miou == pytest.approx(report["metrics"]["semantic"]["mIoU"], abs=1e-12)
    # A rerun without prediction files redoes exactly those images.
    (out / "predictions" / "semantic" / "img01.png").unlink()
    assert eval_main(_tiny_args(root, out, ckpt, tmp_path / "cache", "--save-predictions")) == 0
    assert json.loads((out / "report.json").read_text())["speed"]["images_this_run"] == 1


def test_saved_predictions_use_the_dataset_ids(tmp_path) -> None:
    """ADE20K files hold 1-150 (0 = not scored): a perfect prediction saved equals the annotation file."""
    raw = write_semantic("ade20k", tmp_path / "ade", [1, 2, 150], n=2)
    ds = open_dataset("ade20k", tmp_path / "ade")
    out = tmp_path / "out"
    prepare_output(out, {"fingerprint": {}}, CTX, overwrite=False)
    run_evaluation(OracleSegmenter({s: r - 1 for s, r in raw.items()}), ds, out, CTX, progress=False,
                   save_predictions=True)
    for s in ds.samples:
        saved = np.array(Image.open(out / "predictions" / "semantic" / f"{s.id}.png"))
        assert saved.dtype == np.uint8 and (saved == np.array(Image.open(s.annotation))).all()


def test_saved_panoptic_prediction_is_coco_format(tmp_path) -> None:
    truth = write_coco_panoptic(tmp_path / "coco")
    ds = open_dataset("coco_panoptic", tmp_path / "coco")
    preds = {shape: ids for shape, (ids, _) in truth.items()}
    sem = {}
    for shape, (ids, classes) in truth.items():
        lab = np.full(shape, -1, np.int64)
        for sid, c in classes.items():
            lab[ids == sid] = c
        sem[shape] = lab
    pan = {shape: (ids, {sid: c for sid, c in classes.items()}) for shape, (ids, classes) in truth.items()}
    out = tmp_path / "out"
    prepare_output(out, {"fingerprint": {}}, CTX, overwrite=False)
    run_evaluation(OracleSegmenter(sem, pan), ds, out, CTX, progress=False, save_predictions=True)
    for s in ds.samples:
        rgb = np.array(Image.open(out / "predictions" / "panoptic" / f"{s.id}.png")).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        info = json.loads((out / "predictions" / "panoptic" / f"{s.id}.json").read_text())
        assert (ids == preds[ids.shape]).all()
        assert {d["category_id"] for d in info["segments_info"]} <= {1, 3, 119}
        sem_png = np.array(Image.open(out / "predictions" / "semantic" / f"{s.id}.png"))
        assert set(np.unique(sem_png)) <= {1, 3, 119, 255}  # COCO category ids, 255 = no class


def test_paper_figure_of_another_protocol_is_never_bare() -> None:
    from ovseg_ros.core.segmenter import load_paper_results
    from ovseg_ros.eval.report import headline_rows

    metrics = {"semantic": {"mIoU": 0.3, "pixel_accuracy": 0.5, "mean_accuracy": 0.4}}
    report = {"run": {"segmenter": "clip_es", "preset": "voc"}, "dataset": {"name": "voc", "images": 3},
              "headline": headline_rows(metrics, "voc", load_paper_results("clip_es", "voc"))}
    text = headline_text(report)
    assert "not comparable: paper 75.0" in text and "train" in text
    report["headline"] = headline_rows(metrics, "voc", load_paper_results("itaclip", "voc21"))
    assert "paper 67.9" in headline_text(report) and "not comparable" not in headline_text(report)


def test_reports_use_the_dataset_class_names(tmp_path) -> None:
    raw = write_semantic("voc", tmp_path / "voc", [0, 4, 11, 20, 255], n=2)
    ds = open_dataset("voc", tmp_path / "voc")
    assert ds.class_names[4] == "boat" and ds.class_names[11] == "diningtable" and ds.class_names[20] == "tvmonitor"
    assert ds.vocabulary.names[3] == "ship"  # the query stays CLIP's
    out = tmp_path / "out"
    prepare_output(out, {"fingerprint": {}}, CTX, overwrite=False)
    totals = run_evaluation(OracleSegmenter({s: r - 1 for s, r in raw.items()}), ds, out, CTX, progress=False)
    names = [c["name"] for c in build_report(totals, ds, {}, [])["metrics"]["semantic"]["per_class"]]
    assert "boat" in names and "ship" not in names and "television monitor" not in names


def test_progress_is_plain_lines_off_a_terminal(tmp_path, folder_data, capsys) -> None:
    root, ckpt = folder_data
    args = [a for a in _tiny_args(root, tmp_path / "out", ckpt, tmp_path / "cache") if a != "--no-progress"]
    assert eval_main(args + ["--log-every", "2"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("ovseg-eval: ")]
    assert [ln.split(" images")[0] for ln in lines] == ["ovseg-eval: 0/4", "ovseg-eval: 2/4", "ovseg-eval: 4/4"]


# --- --class-file: the authors' class lists, read from the user's copy ------------------------------------
def test_class_file_in_the_authors_format(tmp_path) -> None:
    from ovseg_ros.eval.class_file import class_file_vocabulary

    write_coco_panoptic(tmp_path / "coco")  # categories person (1), car (3), sky-other-merged (119, stuff)
    ds = open_dataset("coco_panoptic", tmp_path / "coco")
    f = tmp_path / "coco_panoptic_with_prompt_eng.txt"  # FC-CLIP's format, written here (not their data)
    f.write_text("0:invalid_class_id\n1:person,child,girl\n2:bicycle\n3:car,automobile,vehicle\n"
                 "12:invalid_class_id\n119:sky,clouds,vehicle\n")
    vocab = class_file_vocabulary(f, ds)
    assert [c.names for c in vocab.classes] == [("person", "child", "girl"), ("car", "automobile", "vehicle"),
                                                ("sky", "clouds", "vehicle")]  # a shared synonym is kept
    assert [c.is_thing for c in vocab.classes] == [True, True, False]  # the JSON's isthing
    f.write_text("1:person\n3:car\n")
    with pytest.raises(Exception, match="no line for id 119"):
        class_file_vocabulary(f, ds)
    f.write_text("1:person\nthree:car\n")
    with pytest.raises(Exception, match="line 2"):
        class_file_vocabulary(f, ds)


def test_class_file_through_the_command_joins_the_fingerprint(tmp_path, folder_data, capsys) -> None:
    root, ckpt = folder_data
    out, cache = tmp_path / "out", tmp_path / "cache"
    f = tmp_path / "classes.txt"
    f.write_text("0:ground,floor\n1:chair,seat\n2:person,human\n")
    assert eval_main(_tiny_args(root, out, ckpt, cache, "--class-file", str(f), "--limit", "1")) == 0
    fp = json.loads((out / "report.json").read_text())["fingerprint"]
    assert fp["dataset"]["class_file_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert fp["dataset"]["classes"] == ["floor", "chair", "person"]  # reports keep the dataset's names
    f.write_text("0:floor\n1:chair,seat\n2:person,human\n")
    capsys.readouterr()
    assert eval_main(_tiny_args(root, out, ckpt, cache, "--class-file", str(f))) == 2
    assert "dataset.class_file_sha256" in capsys.readouterr().err
