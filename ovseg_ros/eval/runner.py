"""The evaluation loop: segment each image of this rank's shard, store a per-image record, reduce, report.

Per-image records (the image's sparse confusion matrix and PQ statistics, its time) are appended to
``<output>/records/<rank>.jsonl`` and flushed one line per image, so an interrupted run loses at most the
image in flight: a rerun with the same settings reads every record file (whatever the number of ranks that
wrote it) and segments only the images that have none. Aggregates are sums of integers, so the order in
which images were done, and by how many processes, does not change a single digit of the result.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..core.segmenter import Segmenter
from . import distributed as dist
from . import predictions
from .datasets import Dataset, DatasetError, PanopticTarget
from .metrics import ConfusionMatrix, dense, sparse
from .panoptic import SegmentInfo, pq_image_stats

RECORDS = "records"
RUN_FILE = "run.json"
PREDICTIONS = "predictions"


class RunMismatchError(ValueError):
    """The output folder holds records of a run with other settings."""


@dataclass
class Totals:
    """What the ranks reduce: integer sums plus the per-image summaries for the report."""

    confusion: np.ndarray
    pq_stats: Optional[np.ndarray]
    images: list[dict[str, Any]] = field(default_factory=list)
    new_images: int = 0
    wall_seconds: float = 0.0


def prepare_output(out_dir: Path, run: dict[str, Any], ctx: dist.DistContext, overwrite: bool) -> None:
    """Rank 0 checks (or clears) the output folder and writes ``run.json``; the others wait for it.

    Records are reused only when ``run["fingerprint"]`` (see :mod:`.fingerprint`) equals the stored one;
    otherwise the run is refused with the differing fields, or, with ``overwrite``, the old records and
    saved predictions are removed first.
    """
    from .fingerprint import differences

    error = ""
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        run_file = out_dir / RUN_FILE
        if overwrite:
            for sub in (RECORDS, PREDICTIONS):
                if (out_dir / sub).exists():
                    shutil.rmtree(out_dir / sub)
        elif (out_dir / RECORDS).exists() and any((out_dir / RECORDS).iterdir()):
            try:
                old = json.loads(run_file.read_text()) if run_file.is_file() else {}
            except (json.JSONDecodeError, OSError):
                old = {}
            diff = differences(old.get("fingerprint", {}) if isinstance(old, dict) else None,
                               run.get("fingerprint", {}))
            if diff:
                error = (f"{out_dir} holds records of another run, so they cannot be combined with this one:\n  "
                         + "\n  ".join(diff) + "\ngive another --output, or --overwrite to start afresh")
        if not error:
            (out_dir / RECORDS).mkdir(exist_ok=True)
            run_file.write_text(json.dumps(run, indent=2, sort_keys=True))
    errors = dist.all_gather_objects(error, ctx)
    if errors[0]:
        raise RunMismatchError(errors[0])


def load_records(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Every complete record line of every rank's file (a line cut by an interruption is skipped)."""
    done: dict[str, dict[str, Any]] = {}
    for path in sorted((out_dir / RECORDS).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "id" in rec:
                done[rec["id"]] = rec
    return done


def evaluate_image(segmenter: Segmenter, state: Any, dataset: Dataset, index: int,
                   save_to: Optional[Path] = None) -> dict[str, Any]:
    """Segment one image and score it; returns its record. With ``save_to`` (the output folder) the
    prediction is also written there (:mod:`.predictions`) before the record is returned."""
    sample = dataset.samples[index]
    image = dataset.load_image(index)
    target = dataset.load_target(index)
    t0 = time.perf_counter()
    result = segmenter.segment(image, state)
    seconds = time.perf_counter() - t0
    gt_sem = target.semantic if isinstance(target, PanopticTarget) else target
    if result.labels.shape != gt_sem.shape:
        raise DatasetError(f"{sample.id}: the annotation {sample.annotation} is {gt_sem.shape[1]}x{gt_sem.shape[0]} "
                           f"but the image is {image.shape[1]}x{image.shape[0]}")
    pred = dataset.predicted_labels(result.labels)
    cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_index).image_matrix(pred, gt_sem)
    record: dict[str, Any] = {"id": sample.id, "seconds": round(seconds, 6),
                              "size": [int(image.shape[1]), int(image.shape[0])], "confusion": sparse(cm)}
    if isinstance(target, PanopticTarget):
        panoptic = result.panoptic
        if panoptic is None:  # a semantic method: things split into connected components, as the node does
            from ..core.postprocess import panoptic_from_semantic

            panoptic = panoptic_from_semantic(result.labels, result.confidence, result.vocabulary)
        pred_segments = {s.id: SegmentInfo(int(dataset.label_of_class[s.class_id])) for s in panoptic.segments}
        stats = pq_image_stats(target.segment_ids, target.segments, panoptic.segment_ids, pred_segments,
                               dataset.num_classes)
        record["pq"] = sparse(stats)
        if save_to is not None:
            predictions.save(save_to, dataset, sample.id, pred, (panoptic.segment_ids,
                             {sid: info.class_id for sid, info in pred_segments.items()}))
    elif save_to is not None:
        predictions.save(save_to, dataset, sample.id, pred)
    return record


def run_evaluation(
    segmenter: Segmenter,
    dataset: Dataset,
    out_dir: Path,
    ctx: dist.DistContext,
    limit: int = 0,
    progress: bool = True,
    save_predictions: bool = False,
    log_every: int = 50,
) -> Totals:
    """Evaluate this rank's shard (skipping images with records) and reduce over ranks.

    Every rank returns the same :class:`Totals`. ``prepare_output`` must have run before. With
    ``save_predictions`` an image also needs its prediction files to count as done.
    """
    state = segmenter.encode_vocabulary(dataset.vocabulary)
    indices = list(range(len(dataset)))[: limit if limit > 0 else None]
    mine = dist.shard(indices, ctx)
    done = load_records(out_dir)
    if save_predictions:
        predictions.write_meta(out_dir, dataset)
        done = {k: v for k, v in done.items() if predictions.is_saved(out_dir, dataset, k)}
    todo = [i for i in mine if dataset.samples[i].id not in done]
    records = {dataset.samples[i].id: done[dataset.samples[i].id] for i in mine if dataset.samples[i].id in done}
    bar = _progress(len(mine), len(mine) - len(todo), ctx, progress, log_every)
    t0 = time.perf_counter()
    (out_dir / RECORDS).mkdir(parents=True, exist_ok=True)  # other machines may not share rank 0's folder
    record_file = out_dir / RECORDS / f"{ctx.tag}.jsonl"
    _end_torn_line(record_file)
    with open(record_file, "a") as sink:
        for i in todo:
            rec = evaluate_image(segmenter, state, dataset, i, out_dir if save_predictions else None)
            sink.write(json.dumps(rec, separators=(",", ":")) + "\n")
            sink.flush()
            records[rec["id"]] = rec
            if bar is not None:
                bar.update(1)
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return reduce_records(records, dataset, ctx, new_images=len(todo), wall=wall)


def _end_torn_line(path: Path) -> None:
    """Terminate a last line cut by a crash, so the next record starts on its own line (the cut one is
    skipped by :func:`load_records` and its image segmented again, once)."""
    try:
        with open(path, "rb+") as f:
            f.seek(0, 2)
            if f.tell() == 0:
                return
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
    except FileNotFoundError:
        pass


def reduce_records(records: dict[str, dict[str, Any]], dataset: Dataset, ctx: dist.DistContext,
                   new_images: int = 0, wall: float = 0.0) -> Totals:
    k = dataset.num_classes
    confusion = np.zeros((k, k + 1), dtype=np.int64)
    pq = np.zeros((k, 4), dtype=np.int64) if dataset.kind == "panoptic" else None
    summaries = []
    for rec in records.values():
        m = dense(rec["confusion"], confusion.shape)
        confusion += m
        if pq is not None:
            pq += dense(rec.get("pq", []), pq.shape)
        scored = int(m.sum())
        summaries.append({"id": rec["id"], "seconds": rec["seconds"], "size": rec["size"],
                          "pixel_accuracy": float(np.trace(m[:, :k]) / scored) if scored else None})
    confusion = dist.all_reduce_sum(confusion, ctx)
    if pq is not None:
        pq = dist.all_reduce_sum(pq, ctx)
    gathered = dist.all_gather_objects((summaries, new_images, wall), ctx)
    images = sorted((s for g in gathered for s in g[0]), key=lambda s: s["id"])
    return Totals(confusion, pq, images, new_images=sum(g[1] for g in gathered),
                  wall_seconds=max(g[2] for g in gathered))


def _progress(total: int, initial: int, ctx: dist.DistContext, enabled: bool, log_every: int = 50):
    """Rank 0's progress: a tqdm bar (images/s, ETA) on a terminal, else one plain line every ``log_every``
    images (log files get no carriage-return updates); None when disabled."""
    if not enabled or not ctx.is_main:
        return None
    desc = "ovseg-eval" if not ctx.distributed else f"ovseg-eval rank 0/{ctx.world_size}"
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm

            return tqdm(total=total, initial=initial, unit="img", desc=desc, file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            pass
    return LineProgress(total, initial, desc, max(1, log_every))


class LineProgress:
    """``<desc>: 150/1449 images (100 this run), 3.1 images/s, ETA 7.0 min`` every N images and at the end."""

    def __init__(self, total: int, initial: int, desc: str, every: int, stream: Any = None) -> None:
        self.total, self.n, self.start_n, self.desc, self.every = total, initial, initial, desc, every
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.perf_counter()
        self._line()

    def update(self, k: int = 1) -> None:
        self.n += k
        if (self.n - self.start_n) % self.every == 0:
            self._line()

    def close(self) -> None:
        if (self.n - self.start_n) % self.every != 0:
            self._line()

    def _line(self) -> None:
        new = self.n - self.start_n
        dt = time.perf_counter() - self.t0
        rate = new / dt if new and dt > 0 else 0.0
        eta = f", ETA {(self.total - self.n) / rate / 60:.1f} min" if rate > 0 and self.n < self.total else ""
        speed = f", {rate:.2f} images/s" if rate > 0 else ""
        print(f"{self.desc}: {self.n}/{self.total} images ({new} this run){speed}{eta}", file=self.stream,
              flush=True)
