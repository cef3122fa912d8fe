"""The evaluation report: one JSON with everything, a Markdown summary, and the console headline.

The headline puts each measured number beside the paper's published one for the same preset and dataset
(the ``paper:`` entries of the preset files, see docs/evaluation.md); an unverified published number is
marked as such. A published number measured under another protocol (an entry with ``same_protocol: false``,
e.g. CLIP-ES's 75.0 on VOC *train* with ground-truth tags) is never shown bare: the console line and the
tables carry its note.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from .datasets import Dataset
from .metrics import semantic_scores
from .panoptic import panoptic_report
from .runner import Totals

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def build_report(totals: Totals, dataset: Dataset, run: dict[str, Any], paper: list[dict[str, Any]]) -> dict[str, Any]:
    scores = semantic_scores(totals.confusion)
    metrics: dict[str, Any] = {"semantic": scores.as_dict(dataset.class_names)}
    if totals.pq_stats is not None:
        metrics["panoptic"] = panoptic_report(totals.pq_stats, dataset.class_names, dataset.is_thing)
    seconds = [im["seconds"] for im in totals.images]
    speed = {
        "images": len(totals.images),
        "images_this_run": totals.new_images,
        "segment_seconds_mean": sum(seconds) / len(seconds) if seconds else None,
        "segment_seconds_max": max(seconds) if seconds else None,
        "wall_seconds_this_run": totals.wall_seconds,
        "images_per_second_this_run": totals.new_images / totals.wall_seconds if totals.wall_seconds > 0 else None,
        "world_size": run.get("world_size", 1),
    }
    headline = headline_rows(metrics, dataset.name, paper)
    return {"run": run, "fingerprint": run.get("fingerprint", {}), "dataset": {"name": dataset.name, "root": str(dataset.root), "images": len(totals.images),
                                    "classes": dataset.class_names, "ignore_index": dataset.ignore_index},
            "headline": headline, "metrics": metrics, "paper": paper, "speed": speed,
            "confusion_matrix": totals.confusion.tolist(), "images": totals.images}


def _measured(metrics: dict[str, Any], metric: str) -> Optional[float]:
    sem, pan = metrics["semantic"], metrics.get("panoptic")
    table = {"mIoU": sem["mIoU"], "pixel_accuracy": sem["pixel_accuracy"], "mean_accuracy": sem["mean_accuracy"]}
    if pan is not None:
        table.update({"PQ": pan["all"]["PQ"], "SQ": pan["all"]["SQ"], "RQ": pan["all"]["RQ"],
                      "PQ_things": pan["things"]["PQ"], "PQ_stuff": pan["stuff"]["PQ"]})
    value = table.get(metric)
    return None if value is None else 100.0 * value


def headline_rows(metrics: dict[str, Any], dataset: str, paper: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measured headline metrics (percent) with the published value where the preset has one for this dataset."""
    names = ["PQ", "SQ", "RQ", "mIoU"] if "panoptic" in metrics else ["mIoU", "pixel_accuracy", "mean_accuracy"]
    published = {e.get("metric"): e for e in paper if e.get("dataset") == dataset}
    rows = []
    for name in names:
        e = published.get(name)
        rows.append({"metric": name, "measured": _measured(metrics, name),
                     "paper": e.get("value") if e else None,
                     "paper_verified": bool(e.get("verified")) if e else None,
                     "paper_source": e.get("source", "") if e else "",
                     "paper_note": e.get("note", "") if e else "",
                     "paper_same_protocol": bool(e.get("same_protocol", True)) if e else None})
    return rows


def _fmt(x: Optional[float], digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def headline_text(report: dict[str, Any]) -> str:
    run = report["run"]
    lines = [f"{run['segmenter']} / {run['preset']} on {report['dataset']['name']} "
             f"({report['dataset']['images']} images)"]
    for row in report["headline"]:
        paper = "no published number for this preset and dataset"
        if row["paper"] is not None:
            paper = f"paper {row['paper']:.1f}" + ("" if row["paper_verified"] else " (unverified)")
            if row.get("paper_same_protocol") is False:
                paper = f"not comparable: {paper} is {row['paper_note'] or 'measured under another protocol'}"
        lines.append(f"  {row['metric']:<15} {_fmt(row['measured'], 2):>7}   {paper}")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    run, ds, metrics, speed = report["run"], report["dataset"], report["metrics"], report["speed"]
    out = [f"# ovseg-eval: {run['segmenter']} / {run['preset']} on {ds['name']}", ""]
    out += [f"- dataset: `{ds['name']}` at `{ds['root']}`, {ds['images']} images, {len(ds['classes'])} classes, "
            f"ignore label {ds['ignore_index']}",
            f"- segmenter: `{run['segmenter']}`, preset `{run['preset']}`, model `{run.get('model', '')}`, "
            f"options `{json.dumps(run.get('overrides', {}))}`",
            f"- device: {run.get('device', '')}, processes: {speed['world_size']}", "", "## Overall", "",
            "| metric | measured | paper | source |", "|---|---|---|---|"]
    for row in report["headline"]:
        paper = "-" if row["paper"] is None else f"{row['paper']:.1f}" + ("" if row["paper_verified"] else " (unverified)")
        if row["paper"] is not None and row.get("paper_same_protocol") is False:
            paper += " (other protocol, not comparable)"
        note = row["paper_source"] + (f"; {row['paper_note']}" if row["paper_note"] else "")
        out.append(f"| {row['metric']} | {_fmt(row['measured'], 2)} | {paper} | {note or '-'} |")
    pan = metrics.get("panoptic")
    if pan is not None:
        out += ["", "| | PQ | SQ | RQ | classes |", "|---|---|---|---|---|"]
        for which in ("all", "things", "stuff"):
            r = pan[which]
            out.append(f"| {which} | {_pct(r['PQ'])} | {_pct(r['SQ'])} | {_pct(r['RQ'])} | {r['classes']} |")
    out += ["", "## Per class", ""]
    sem = metrics["semantic"]["per_class"]
    if pan is not None:
        out += ["| id | class | IoU | accuracy | PQ | SQ | RQ | TP | FP | FN |", "|---|---|---|---|---|---|---|---|---|---|"]
        for s, p in zip(sem, pan["per_class"]):
            out.append(f"| {s['id']} | {s['name']} | {_pct(s['IoU'])} | {_pct(s['accuracy'])} | {_pct(p['PQ'])} | "
                       f"{_pct(p['SQ'])} | {_pct(p['RQ'])} | {p['TP']} | {p['FP']} | {p['FN']} |")
    else:
        out += ["| id | class | IoU | accuracy | GT pixels |", "|---|---|---|---|---|"]
        for s in sem:
            out.append(f"| {s['id']} | {s['name']} | {_pct(s['IoU'])} | {_pct(s['accuracy'])} | {s['gt_pixels']} |")
    out += ["", "## Speed", "",
            f"- segment time per image: mean {_fmt(speed['segment_seconds_mean'], 3)} s, "
            f"max {_fmt(speed['segment_seconds_max'], 3)} s",
            f"- this run: {speed['images_this_run']} images in {_fmt(speed['wall_seconds_this_run'], 1)} s "
            f"({_fmt(speed['images_per_second_this_run'], 2)} images/s over {speed['world_size']} process(es), "
            f"reading and scoring included)", ""]
    out += _fingerprint_md(report.get("fingerprint") or {})
    return "\n".join(out)


def _fingerprint_md(fp: dict[str, Any]) -> list[str]:
    """The reproducibility section: what the records depend on (see ovseg_ros/eval/fingerprint.py)."""
    if not fp:
        return []
    ds = fp.get("dataset", {})
    out = ["## Fingerprint", "",
           f"- package: ovseg_ros {fp.get('package', '?')}",
           f"- segmenter: `{fp.get('segmenter', '')}`, preset `{fp.get('preset', '')}`"]
    out += [f"- weights `{k}`: `{v}`" for k, v in fp.get("weights", {}).items()]
    out += [f"- dataset: `{ds.get('name', '')}` at `{ds.get('root', '')}`, {ds.get('images', '?')} images, "
            f"samples sha256 `{ds.get('samples_sha256', '')}`"]
    out += [f"- dataset {k[:-7]} sha256 `{v}`" for k, v in ds.items() if k.endswith("_sha256") and k != "samples_sha256"]
    out += ["", "Resolved segmenter configuration:", "", "```json",
            json.dumps(fp.get("config", {}), indent=1, sort_keys=True), "```", ""]
    return out


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    j, m = out_dir / REPORT_JSON, out_dir / REPORT_MD
    j.write_text(json.dumps(report, indent=1))
    m.write_text(markdown(report))
    return j, m
