"""The offline tools shard their images across torchrun processes (each writes its own files) and skip
outputs that exist, so reruns continue where they stopped."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import ovseg_ros
from ovseg_ros import cli


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return [f"im{i}" for i in range(n)]


def test_ovseg_segment_shards_by_rank_and_skips_existing(tmp_path, tiny_vit_checkpoint, monkeypatch, capsys) -> None:
    stems = _images(tmp_path / "in", 5)
    out = tmp_path / "out"
    args = [str(tmp_path / "in"), "-o", str(out), "--segmenter", "dense_clip", "--model", "ovseg-tiny-vit",
            "--pretrained", "", "--checkpoint", str(tiny_vit_checkpoint), "--device", "cpu",
            "--options", "{short_side: 32}", "--cache-dir", str(tmp_path / "cache"), "--vocabulary", "a", "b"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cli.main(args) == 0
    assert sorted(p.stem for p in out.glob("*.json")) == stems[1::2]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli.main(args) == 0
    assert sorted(p.stem for p in out.glob("*.json")) == stems
    capsys.readouterr()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli.main(args) == 0
    assert "->" not in capsys.readouterr().out  # everything existed: nothing redone
    assert cli.main(args + ["--overwrite"]) == 0
    assert capsys.readouterr().out.count("->") == 5


def test_clipes_pseudo_labels_two_gloo_processes(tmp_path, tiny_vit_checkpoint) -> None:
    stems = _images(tmp_path / "in", 3)
    out = tmp_path / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(ovseg_ros.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    tool = ["-m", "ovseg_ros.tools.clipes_pseudo_labels", str(tmp_path / "in"), "-o", str(out),
            "--classes", "floor", "chair", "--set", "crf=false", "--model", "ovseg-tiny-vit", "--checkpoint",
            str(tiny_vit_checkpoint), "--precision", "fp32", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}"] + tool
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0: wrote 2" in done.stdout and "rank 1: wrote 1" in done.stdout
    assert sorted(p.stem for p in out.glob("*.png")) == stems
    assert sorted(json.loads((out / "tags.json").read_text())) == stems  # rank 0 merged both records
    again = subprocess.run([sys.executable] + tool, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "wrote 0 pseudo-label PNGs" in again.stdout
