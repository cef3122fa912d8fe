"""ovseg-eval over torch.distributed (2 gloo processes on CPU, loopback only) and resumed runs give exactly
the single-process result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ovseg_ros
from eval_helpers import OracleSegmenter, write_coco_panoptic, write_folder_classes, write_semantic
from ovseg_ros.eval import distributed as dist
from ovseg_ros.eval.cli import main as eval_main
from ovseg_ros.eval.datasets import open_dataset
from ovseg_ros.eval.report import build_report
from ovseg_ros.eval.runner import RECORDS, RunMismatchError, prepare_output, run_evaluation

CTX = dist.DistContext()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _comparable(report: dict) -> dict:
    """What must not depend on the number of processes (timings and run settings do)."""
    return {k: report[k] for k in ("metrics", "confusion_matrix", "headline", "dataset")} | {
        "images": [im["id"] for im in report["images"]]}


def test_shard_is_strided_and_complete() -> None:
    items = list(range(7))
    parts = [dist.shard(items, dist.DistContext(r, 3, r, "gloo")) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(parts, [])) == items


def test_two_gloo_processes_equal_one_process(tmp_path, tiny_vit_checkpoint) -> None:
    """torchrun --nproc_per_node=2 on CPU: same confusion matrix, PQ statistics and report as one process,
    also when it resumes records written by an earlier single-process run."""
    data = tmp_path / "coco"
    write_coco_panoptic(data)
    common = ["--segmenter", "dense_clip", "--preset", "realtime", "--dataset", "coco_panoptic", "--root", str(data),
              "--model", "ovseg-tiny-vit", "--pretrained", "", "--checkpoint", str(tiny_vit_checkpoint),
              "--options", "{short_side: 32}", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
              "--device", "cpu"]
    assert eval_main(common + ["-o", str(tmp_path / "single")]) == 0
    # The distributed run resumes one image done by a single process, then two ranks share the rest.
    assert eval_main(common + ["-o", str(tmp_path / "multi"), "--limit", "1"]) == 0
    src = str(Path(ovseg_ros.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "ovseg_ros.eval"] + common + ["-o", str(tmp_path / "multi")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = json.loads((tmp_path / "single" / "report.json").read_text())
    multi = json.loads((tmp_path / "multi" / "report.json").read_text())
    assert multi["run"]["world_size"] == 2 and multi["run"]["backend"] == "gloo"
    assert _comparable(multi) == _comparable(single)
    assert "PQ" in done.stdout  # rank 0 printed the headline


def _oracle_setup(tmp_path: Path):
    root = tmp_path / "data"
    write_folder_classes(root, ["a", "b", "c"])
    raw = write_semantic("folder", root, [0, 1, 2, 255], n=5)
    rng = np.random.default_rng(3)
    preds = {s: rng.integers(-1, 3, s) for s in raw}
    return open_dataset("folder", root), preds


def _run(ds, seg, out: Path, limit: int = 0, overwrite: bool = False) -> dict:
    run = {"segmenter": "oracle", "fingerprint": {"segmenter": "oracle", "dataset": ds.name}}
    prepare_output(out, run, CTX, overwrite)
    return build_report(run_evaluation(seg, ds, out, CTX, limit, progress=False), ds, run, [])


def test_interrupted_run_resumes_to_the_same_result(tmp_path) -> None:
    ds, preds = _oracle_setup(tmp_path)
    full = _run(ds, OracleSegmenter(preds), tmp_path / "full")
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _run(ds, OracleSegmenter(preds, stop_after=4), out)
    records = out / RECORDS / "rank000.jsonl"
    assert len(records.read_text().splitlines()) == 3
    with records.open("a") as f:
        f.write('{"id": "img03", "conf')  # a line cut by the interruption
    oracle = OracleSegmenter(preds)
    resumed = _run(ds, oracle, out)
    assert oracle.calls == 2 and resumed["speed"]["images_this_run"] == 2
    assert _comparable(resumed) == _comparable(full)


def test_limit_then_full_run_and_mismatch(tmp_path) -> None:
    ds, preds = _oracle_setup(tmp_path)
    full = _run(ds, OracleSegmenter(preds), tmp_path / "full")
    out = tmp_path / "limited"
    partial = _run(ds, OracleSegmenter(preds), out, limit=2)
    assert partial["dataset"]["images"] == 2
    assert _comparable(_run(ds, OracleSegmenter(preds), out)) == _comparable(full)
    run = {"segmenter": "other", "fingerprint": {"segmenter": "other", "dataset": ds.name}}
    with pytest.raises(RunMismatchError, match="another run(.|\n)*segmenter: oracle -> other"):
        prepare_output(out, run, CTX, overwrite=False)
    prepare_output(out, run, CTX, overwrite=True)
    assert not list((out / RECORDS).glob("*.jsonl"))
