"""Regenerate the parity goldens: ``python tests/parity/regen.py [segmenter-preset ...]`` (all by default).

Only for a deliberate change of a method's numbers, committed together with the code change and a reason.
Run it with the package importable (``source scripts/env.sh``) and OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


def main(argv: list[str]) -> int:
    wanted = set(argv)
    cases = [c for c in harness.CASES if not wanted or f"{c[0]}-{c[1]}" in wanted]
    if wanted and len(cases) != len(wanted):
        known = ", ".join(f"{s}-{p}" for s, p in harness.CASES)
        print(f"unknown case(s) in {sorted(wanted)}; known: {known}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        weights = harness.make_weights(Path(tmp))
        for segmenter, preset in cases:
            t = time.perf_counter()
            record = harness.run_case(segmenter, preset, weights)
            path = harness.golden_path(segmenter, preset)
            harness.save(path, record)
            print(f"{path.name}: {len(record)} stages, {path.stat().st_size} bytes, {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
