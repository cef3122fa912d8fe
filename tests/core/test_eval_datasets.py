"""ovseg_ros.eval on tiny datasets written in every standard layout: oracle predictions with exact metrics,
a tiny random model end to end, and clear errors for broken layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eval_helpers import (
    OracleSegmenter,
    write_coco_panoptic,
    write_folder_classes,
    write_label,
    write_semantic,
)
from ovseg_ros.eval import distributed as dist
from ovseg_ros.eval.cli import main as eval_main
from ovseg_ros.eval.datasets import DatasetError, open_dataset
from ovseg_ros.eval.report import build_report
from ovseg_ros.eval.runner import prepare_output, run_evaluation

CTX = dist.DistContext()


def _perfect(dataset, raw_by_shape, to_label):
    """Oracle predictions in vocabulary ids that reproduce the ground truth (ignored pixels: unlabeled)."""
    inverse = {int(lab): v for v, lab in enumerate(dataset.label_of_class)}
    preds = {}
    for shape, raw in raw_by_shape.items():
        gt = to_label(raw)
        preds[shape] = np.vectorize(lambda x: inverse.get(int(x), -1))(gt)
    return preds


def _run(dataset, segmenter, out: Path, limit: int = 0):
    run = {"segmenter": "oracle", "preset": "", "overrides": {}, "dataset": dataset.name, "root": str(dataset.root),
           "num_classes": dataset.num_classes}
    prepare_output(out, run, CTX, overwrite=False)
    totals = run_evaluation(segmenter, dataset, out, CTX, limit, progress=False)
    return totals, build_report(totals, dataset, run, [])


# layout, reader, raw label values written, raw -> dataset label rule, number of dataset classes
CASES = [
    ("voc", "voc", [0, 1, 15, 20, 255], lambda r: r, 21),
    ("context", "context60", [0, 3, 59, 255], lambda r: r, 60),
    ("context", "context59", [0, 3, 59, 255], lambda r: np.where(r == 0, 255, np.where(r == 255, 255, r - 1)), 59),
    ("coco_object", "coco_object", [0, 1, 80, 255], lambda r: r, 81),
    ("coco_stuff", "coco_stuff", [0, 79, 170, 255], lambda r: r, 171),
    ("cityscapes", "cityscapes", [0, 13, 18, 255], lambda r: r, 19),
    ("ade20k", "ade20k", [0, 1, 150], lambda r: np.where(r == 0, 255, r - 1), 150),
]


@pytest.mark.parametrize("layout,reader,values,rule,k", CASES, ids=[c[1] for c in CASES])
def test_oracle_scores_exactly_one_in_every_layout(tmp_path, layout, reader, values, rule, k) -> None:
    raw = write_semantic(layout, tmp_path / "data", values)
    ds = open_dataset(reader, tmp_path / "data")
    assert len(ds) == 3 and ds.num_classes == k and len(ds.vocabulary) == len(ds.label_of_class)
    totals, report = _run(ds, OracleSegmenter(_perfect(ds, raw, rule)), tmp_path / "out")
    # Ground-truth pixel counts per class, straight from the written files and the layout's rule.
    expected = np.zeros(k, np.int64)
    for r in raw.values():
        g = rule(r)
        g = g[g != 255]
        expected += np.bincount(g, minlength=k)
    assert np.array_equal(totals.confusion.sum(axis=1), expected)
    assert np.array_equal(np.diag(totals.confusion[:, :k]), expected)  # every scored pixel right
    sem = report["metrics"]["semantic"]
    assert sem["mIoU"] == 1.0 and sem["pixel_accuracy"] == 1.0 and sem["mean_accuracy"] == 1.0
    present = [c["id"] for c in sem["per_class"] if c["IoU"] is not None]
    assert present == sorted(set(np.nonzero(expected)[0].tolist()))


def test_voc_imperfect_oracle_by_hand(tmp_path) -> None:
    """VOC: unlabeled predictions count as background; the ignore label counts nowhere."""
    raw = write_semantic("voc", tmp_path / "voc", [0], n=1)
    shape = next(iter(raw))
    gt = np.zeros(shape, np.int64)
    gt[0, 1] = gt[1, 0] = 15  # person
    gt[1, 1] = 255
    gt[2:, :] = 255
    gt[0, 2:] = gt[1, 2:] = 255
    write_label(tmp_path / "voc" / "SegmentationClass" / "img00.png", gt, palette=True)
    pred = np.full(shape, -1)
    pred[0, 1] = 14  # person (vocabulary id 14 = label 15)
    pred[1, 1] = 0  # aeroplane on an ignored pixel: not counted
    ds = open_dataset("voc", tmp_path / "voc")
    _, report = _run(ds, OracleSegmenter({shape: pred}), tmp_path / "out")
    sem = report["metrics"]["semantic"]
    # background: 1 right, person: 1 right, 1 missed as background -> IoU 1/2 both; aeroplane: NaN.
    assert sem["per_class"][0]["IoU"] == 0.5 and sem["per_class"][15]["IoU"] == 0.5
    assert sem["per_class"][1]["IoU"] is None
    assert sem["mIoU"] == 0.5 and sem["pixel_accuracy"] == pytest.approx(2 / 3) and sem["mean_accuracy"] == 0.75


def test_folder_layout_with_background_and_16_bit_labels(tmp_path) -> None:
    root = tmp_path / "mine"
    write_folder_classes(root, ["floor", "pallet", "forklift"], background=0)
    raw = write_semantic("folder", root, [0, 1, 2, 255])
    ds = open_dataset("folder", root)
    assert ds.vocabulary.names == ["pallet", "forklift"] and ds.unlabeled_label == 0
    preds = {s: np.where(r == 1, 0, np.where(r == 2, 1, -1)) for s, r in raw.items()}
    # Predict 'pallet' where it is 'forklift' in the first image: exact IoUs follow from pixel counts.
    first = next(iter(raw))
    preds[first] = np.where(raw[first] == 2, 0, preds[first])
    _, report = _run(ds, OracleSegmenter(preds), tmp_path / "out")
    n = {c: sum(int((r == c).sum()) for r in raw.values()) for c in (0, 1, 2)}
    moved = int((raw[first] == 2).sum())
    per = report["metrics"]["semantic"]["per_class"]
    assert per[0]["IoU"] == 1.0
    assert per[1]["IoU"] == pytest.approx(n[1] / (n[1] + moved))
    assert per[2]["IoU"] == pytest.approx((n[2] - moved) / n[2])
    # 16-bit label PNGs are read as they are.
    write_folder_classes(tmp_path / "big", [f"c{i}" for i in range(300)])
    write_semantic("folder", tmp_path / "big", [0, 299], n=1)
    big = open_dataset("folder", tmp_path / "big")
    assert big.load_target(0).max() == 299


def test_coco_panoptic_oracle_pq_exact(tmp_path) -> None:
    truth = write_coco_panoptic(tmp_path / "coco")
    ds = open_dataset("coco_panoptic", tmp_path / "coco")
    assert ds.kind == "panoptic" and ds.class_names == ["person", "car", "sky-other-merged"]
    assert ds.vocabulary.names == ["person", "car", "sky"] and ds.is_thing == [True, True, False]
    sem_preds, pan_preds = {}, {}
    for shape, (ids, classes) in truth.items():
        labels = np.full(shape, -1)
        for sid, c in classes.items():
            labels[ids == sid] = c
        sem_preds[shape] = labels
        pan_preds[shape] = (ids, classes)  # the crowd region predicted as a car segment: ignored, no FP
    _, report = _run(ds, OracleSegmenter(sem_preds, pan_preds), tmp_path / "out")
    pan = report["metrics"]["panoptic"]
    assert pan["all"]["PQ"] == 1.0 and pan["things"]["classes"] == 2 and pan["stuff"]["classes"] == 1
    assert report["metrics"]["semantic"]["mIoU"] == 1.0
    assert [row["metric"] for row in report["headline"]] == ["PQ", "SQ", "RQ", "mIoU"]
    # Drop one of the two persons: person TP 1, FN 1 -> PQ 2/3; the others stay 1.
    a_shape = (6, 9)
    ids, classes = truth[a_shape]
    ids2 = np.where(ids == 22, 0, ids)
    pan_preds[a_shape] = (ids2, {k: v for k, v in classes.items() if k != 22})
    _, report = _run(ds, OracleSegmenter(sem_preds, pan_preds), tmp_path / "out2")
    pan = report["metrics"]["panoptic"]
    assert pan["per_class"][0]["TP"] == 1 and pan["per_class"][0]["FN"] == 1
    assert pan["all"]["PQ"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert pan["all"]["SQ"] == 1.0 and pan["things"]["RQ"] == pytest.approx((2 / 3 + 1) / 2)


def test_semantic_segmenter_on_panoptic_data_gets_connected_components(tmp_path) -> None:
    truth = write_coco_panoptic(tmp_path / "coco")
    ds = open_dataset("coco_panoptic", tmp_path / "coco")
    sem_preds = {}
    for shape, (ids, classes) in truth.items():
        labels = np.full(shape, -1)
        for sid, c in classes.items():
            labels[ids == sid] = c
        sem_preds[shape] = labels
    _, report = _run(ds, OracleSegmenter(sem_preds), tmp_path / "out")
    # The two persons of image A are separate components, so they are found as two segments.
    assert report["metrics"]["panoptic"]["all"]["PQ"] == 1.0


def test_tiny_random_model_end_to_end_through_the_command(tmp_path, tiny_vit_checkpoint, capsys) -> None:
    root = tmp_path / "mine"
    write_folder_classes(root, ["floor", "chair", "person"])
    write_semantic("folder", root, [0, 1, 2, 255])
    out = tmp_path / "out"
    args = ["--segmenter", "dense_clip", "--preset", "realtime", "--dataset", "folder", "--root", str(root),
            "-o", str(out), "--model", "ovseg-tiny-vit", "--pretrained", "", "--checkpoint", str(tiny_vit_checkpoint),
            "--device", "cpu", "--options", "{short_side: 32}", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert eval_main(args) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "no published number" in printed
    report = json.loads((out / "report.json").read_text())
    cm = np.array(report["confusion_matrix"])
    assert cm.shape == (3, 4) and cm.sum() == report["metrics"]["semantic"]["scored_pixels"] > 0
    assert 0.0 <= report["metrics"]["semantic"]["pixel_accuracy"] <= 1.0
    assert report["speed"]["images"] == 3 and report["run"]["model"] == "ovseg-tiny-vit"
    md = (out / "report.md").read_text()
    assert "## Per class" in md and "| 2 | person |" in md
    # A rerun finds every record and segments nothing.
    assert eval_main(args) == 0
    assert json.loads((out / "report.json").read_text())["speed"]["images_this_run"] == 0


def test_paper_number_beside_the_measured_one() -> None:
    from ovseg_ros.core.segmenter import load_paper_results
    from ovseg_ros.eval.cli import default_preset
    from ovseg_ros.eval.report import headline_rows

    paper = load_paper_results("itaclip", "voc21")
    metrics = {"semantic": {"mIoU": 0.5, "pixel_accuracy": 0.75, "mean_accuracy": 0.6}}
    rows = headline_rows(metrics, "voc", paper)
    assert rows[0] == {"metric": "mIoU", "measured": 50.0, "paper": 67.9, "paper_verified": True,
                       "paper_source": paper[0]["source"], "paper_note": "", "paper_same_protocol": True}
    assert headline_rows(metrics, "ade20k", paper)[0]["paper"] is None
    assert default_preset("itaclip", "voc") == "voc21" and default_preset("fcclip", "coco_panoptic") == "coco_panoptic"
    assert default_preset("itaclip", "folder") == "realtime"
    assert load_paper_results("car", "voc")[0]["verified"] is False


@pytest.mark.parametrize("reader", ["voc", "context60", "coco_object", "coco_stuff", "cityscapes", "ade20k",
                                    "coco_panoptic", "folder"])
def test_missing_dataset_names_the_expected_layout(tmp_path, reader, capsys) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="expected layout"):
        open_dataset(reader, tmp_path / "empty")
    rc = eval_main(["--segmenter", "dense_clip", "--dataset", reader, "--root", str(tmp_path / "nowhere"),
                    "--device", "cpu", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "is not a folder" in err and "expected layout" in err and "Traceback" not in err


def test_malformed_datasets_fail_clearly(tmp_path) -> None:
    root = tmp_path / "voc"
    write_semantic("voc", root, [0, 1])
    (root / "SegmentationClass" / "img01.png").unlink()
    with pytest.raises(DatasetError, match="annotation of 'img01' is missing"):
        open_dataset("voc", root)
    coco = tmp_path / "coco"
    write_coco_panoptic(coco)
    (coco / "annotations" / "panoptic_val2017.json").write_text('{"images": []}')
    with pytest.raises(DatasetError, match="not a COCO panoptic annotation file"):
        open_dataset("coco_panoptic", coco)
    folder = tmp_path / "f"
    write_folder_classes(folder, ["a", "b"])
    write_semantic("folder", folder, [0, 1], n=1)
    write_label(folder / "labels" / "img00.png", np.zeros((3, 3)))  # wrong size
    (folder / "images" / "img00.png").write_bytes(b"not an image")
    ds = open_dataset("folder", folder)
    with pytest.raises(DatasetError, match="not a readable image"):
        ds.load_image(0)
    write_folder_classes(folder, ["a", "b"], background=7)
    with pytest.raises(DatasetError, match="background a class index"):
        open_dataset("folder", folder)


def test_label_size_mismatch_is_reported(tmp_path) -> None:
    folder = tmp_path / "f"
    write_folder_classes(folder, ["a", "b"])
    raw = write_semantic("folder", folder, [0, 1], n=1)
    write_label(folder / "labels" / "img00.png", np.zeros((3, 3)))
    ds = open_dataset("folder", folder)
    shape = next(iter(raw))
    with pytest.raises(DatasetError, match="annotation .* is 3x3 but the image is"):
        _run(ds, OracleSegmenter({shape: np.zeros(shape)}), tmp_path / "out")


def test_list_and_layouts(capsys) -> None:
    assert eval_main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "voc21  [paper: voc mIoU 67.9]" in out and "voc  [paper: voc mIoU 67.6 (unverified)]" in out
    assert eval_main(["--layouts"]) == 0
    assert "SegmentationClassContext" in capsys.readouterr().out
    assert eval_main(["--segmenter", "itaclip"]) == 2
    assert "give --dataset, --root" in capsys.readouterr().err


def test_panoptic_markdown_report(tmp_path) -> None:
    from ovseg_ros.eval.report import markdown

    truth = write_coco_panoptic(tmp_path / "coco")
    ds = open_dataset("coco_panoptic", tmp_path / "coco")
    preds = {s: np.full(s, -1) for s in truth}
    _, report = _run(ds, OracleSegmenter(preds), tmp_path / "out")
    md = markdown(report)
    assert "| things | 0.00 | 0.00 | 0.00 | 2 |" in md and "| 2 | sky-other-merged |" in md
    assert report["metrics"]["panoptic"]["per_class"][0]["FN"] == 2  # two persons, nothing predicted


@pytest.fixture(scope="module")
def tiny_dense_clip(tiny_model_overrides):
    from ovseg_ros.core.segmenter import build_segmenter

    return build_segmenter("dense_clip", "realtime", {**tiny_model_overrides, "short_side": 32, "templates": "photo"})


@pytest.mark.parametrize("layout,reader,values,rule,k", CASES, ids=[c[1] for c in CASES])
def test_tiny_random_model_in_every_layout(tmp_path, tiny_dense_clip, layout, reader, values, rule, k) -> None:
    """A real (tiny, random) segmenter through each reader: every scored pixel lands in the matrix once."""
    raw = write_semantic(layout, tmp_path / "data", values)
    ds = open_dataset(reader, tmp_path / "data")
    totals, report = _run(ds, tiny_dense_clip, tmp_path / "out")
    scored = sum(int((rule(r) != 255).sum()) for r in raw.values())
    assert totals.confusion.shape == (k, k + 1) and int(totals.confusion.sum()) == scored
    sem = report["metrics"]["semantic"]
    assert 0.0 <= sem["mIoU"] <= 1.0 and 0.0 <= sem["pixel_accuracy"] <= 1.0
    if ds.unlabeled_label == 0:  # background datasets: unlabeled predictions are background, never "no class"
        assert sem["unlabeled_pixels"] == 0
