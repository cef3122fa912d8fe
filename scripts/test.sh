#!/usr/bin/env bash
# The test command (README, .ci/run): set up/build (scripts/setup.sh), then the whole pytest suite against
# the built package, DDS on loopback only. Extra arguments go to pytest (e.g. -k vocabulary; tests/ros runs
# only that folder).
# Exit status: pytest's, so any failure, a collection error or "no tests collected" (5) is non-zero.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
start=$(date +%s)

bash scripts/setup.sh
# shellcheck disable=SC1091
source scripts/env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1
# Here the ROS integration tests must run: a missing build fails them instead of skipping them.
export OVSEG_REQUIRE_ROS=1
# tests/conftest.py picks a ROS_DOMAIN_ID unique to the session; don't inherit env.sh's default.
unset ROS_DOMAIN_ID

# `pytest` (not `python -m pytest`): the source tree is not put first on sys.path, so the installed
# package (install/, on PYTHONPATH via env.sh) is what gets tested.
set +e
# Arguments naming test files or folders replace the default `tests` (options alone keep it).
targets=(tests)
for arg in "$@"; do
  if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then targets=(); break; fi
done
pytest "${targets[@]}" -p no:cacheprovider -q -ra --durations=10 "$@"
rc=$?
set -e
elapsed=$(( $(date +%s) - start ))
case $rc in
  0) echo "[test] PASSED in ${elapsed} s" ;;
  5) echo "[test] FAILED: pytest collected no tests (exit 5) in ${elapsed} s" ;;
  *) echo "[test] FAILED (pytest exit $rc) in ${elapsed} s" ;;
esac
exit $rc
