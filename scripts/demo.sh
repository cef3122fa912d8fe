#!/usr/bin/env bash
# The main job on a fresh machine: set up and build, then run segment_node on a synthetic camera stream
# over loopback DDS, with a tiny RANDOM-weight model (no CLIP weights exist here: masks are meaningless).
# See scripts/demo_stream.py for what is shown. Extra arguments go to demo_stream.py (--help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
# shellcheck disable=SC1091
source scripts/env.sh   # venv, install space, loopback-only DDS profile, ROS_DOMAIN_ID
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
echo "[demo] ROS_DOMAIN_ID=$ROS_DOMAIN_ID, DDS profile $FASTDDS_DEFAULT_PROFILES_FILE (loopback only)"
python scripts/demo_stream.py --workdir "$ROOT/log/demo" "$@"
