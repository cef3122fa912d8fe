#!/usr/bin/env python3
"""Node CPU per frame under different rclpy executors, interleaved in one run (issue 18 item 6).

Runs bench_node_stream's measurement (the real segment_node, ``color_key`` by default, a client that publishes
pre-serialised frames and reads only stamps) once per executor variant per rate, round after round, so that
every variant sees the same load drift; prints each run and the per-variant medians with their ratio to the
node's own executor. Variants (``--variants``):

* ``default``: the node as shipped (MultiThreadedExecutor, 5 + cameras threads);
* ``events``: rclpy.experimental.EventsExecutor (benchmark-only, swapped in by executor_variants/sitecustomize.py).
  Not in the default list: under rclpy 9.1 no camera frame reaches the node's image callback (the warm-up then
  waits its 300 s in vain; see probe_events_executor.py);
* ``multi_threaded:N``: MultiThreadedExecutor with N threads.

    source scripts/env.sh && python benchmarks/bench_executor.py --rates 15 30 --rounds 2 --frames 300
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["default", "multi_threaded:2"])
    p.add_argument("--rates", nargs="+", type=float, default=[15.0, 30.0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--segmenter", default="color_key")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    sys.path.insert(0, str(HERE))
    import os

    import rclpy

    import bench_node_stream as bns

    sys.path.insert(0, str(HERE.parent / "scripts"))
    from stream_client import StreamClient

    rclpy.init()
    client = StreamClient("ovseg_bench_executor")
    runs: list[dict[str, Any]] = []
    pythonpath = os.environ.get("PYTHONPATH", "")
    try:
        for rnd in range(args.rounds):
            for rate in args.rates:
                for variant in args.variants:
                    sys.argv = ["bench_node_stream", "--frames", str(args.frames), "--rate", str(rate),
                                "--segmenter", args.segmenter]
                    bargs = bns.parse_args()
                    env = {} if variant == "default" else {
                        "OVSEG_BENCH_EXECUTOR": variant,
                        "PYTHONPATH": f"{HERE / 'executor_variants'}{os.pathsep}{pythonpath}"}
                    result, codes = bns.run_once(bargs, client, False, len(runs), env)
                    if not result:
                        print(f"{variant} at {rate:g} Hz: the node did not run")
                        continue
                    c = result["per_camera"][0]
                    row = {"round": rnd, "rate": rate, "variant": variant, "exit": codes,
                           "cpu_ms_per_frame": result["node_cpu_ms_per_frame"],
                           "cpu_ms_per_received": result["node_cpu_ms_per_received_frame"],
                           "cpu_pct": result["node_cpu_pct"], "processed": c["processed_by_node"],
                           "sent": args.frames, "p50_ms": c["e2e_latency_ms"]["p50"],
                           "p95_ms": c["e2e_latency_ms"]["p95"],
                           "load": f"{result['loadavg_start'].split()[0]} -> {result['loadavg_end'].split()[0]}",
                           "threads": result["node_thread_cpu_ms_per_frame"]}
                    runs.append(row)
                    threads = ", ".join(f"{k} {v:.1f}" for k, v in list(row["threads"].items())[:4])
                    print(f"round {rnd} {rate:>4g} Hz {variant:<18} CPU {row['cpu_ms_per_frame']:6.2f} ms/frame "
                          f"({row['cpu_pct']:4.0f} %), processed {row['processed']}/{args.frames}, "
                          f"p50/p95 {row['p50_ms']:.1f}/{row['p95_ms']:.1f} ms, load {row['load']}, exit {codes} "
                          f"[{threads}]", flush=True)
    finally:
        client.close()
        rclpy.try_shutdown()
    print("\nmedians (ms CPU per processed frame; ratio to default):")
    for rate in args.rates:
        base = [r["cpu_ms_per_frame"] for r in runs if r["rate"] == rate and r["variant"] == "default"]
        for variant in args.variants:
            v = [r["cpu_ms_per_frame"] for r in runs if r["rate"] == rate and r["variant"] == variant]
            if v and base:
                m = statistics.median(v)
                print(f"  {rate:>4g} Hz {variant:<18} {m:6.2f}  x{m / statistics.median(base):.2f}  (runs: "
                      + ", ".join(f"{x:.2f}" for x in v) + ")")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
