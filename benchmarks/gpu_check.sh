#!/usr/bin/env bash
# One-command GPU check (issue 10): every CUDA-only test, the segmenter benchmark on cuda in fp16 and fp32 at
# 480x640 and 720x1280 (every segmenter's realtime preset, real architecture sizes, random weights), and the
# node stream at 30 and 60 Hz with a real-size ViT-B/16. Prints one table and writes it, with every step's
# full output, to $OVSEG_GPU_CHECK_OUT (default log/gpu_check/). Budget: <= 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh             # on a machine with CUDA
#   bash benchmarks/gpu_check.sh --dry-run   # CPU rehearsal (tiny sizes, ~1-2 min): checks the plumbing
#
# Without CUDA and without --dry-run it says so and exits 0 (CI never depends on it).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT="${OVSEG_GPU_CHECK_OUT:-$ROOT/log/gpu_check}"
mkdir -p "$OUT"
TABLE="$OUT/gpu_check.md"
JSONL="$OUT/measured.jsonl"
: > "$JSONL"
export OVSEG_GPU_CHECK_JSON="$JSONL" HF_HUB_OFFLINE=1 OVSEG_PROFILE_STAGES=1
if [[ -f install/setup.bash || -f scripts/env.sh ]]; then
  # shellcheck disable=SC1091
  source scripts/env.sh >/dev/null 2>&1 || true
fi
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

CUDA="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)"
if [[ -z "$CUDA" && $DRY -eq 0 ]]; then
  echo "gpu_check: CUDA is absent on this machine: nothing to check (bash benchmarks/gpu_check.sh --dry-run rehearses on the CPU)"
  printf '| check | status |\n|---|---|\n| CUDA device | absent: not run |\n' > "$TABLE"
  exit 0
fi
if [[ $DRY -eq 1 ]]; then
  # One segmenter, one template (text encoding of a real ViT-B/16 on a CPU is what takes time here).
  DEVICE=cpu; SIZES="64x80"; PRECISIONS="fp32"; REPEATS=1; FRAMES=20; SEGMENTERS="--segmenters dense_clip"
  BENCH_OPTIONS="{templates: photo}"
  [[ -z "$CUDA" ]] && echo "gpu_check: CUDA is absent: dry run on the CPU (tiny sizes; figures mean nothing)"
else
  DEVICE=cuda; SIZES="480x640 720x1280"; PRECISIONS="fp16 fp32"; REPEATS=5; FRAMES=300; SEGMENTERS=""
  BENCH_OPTIONS=""
fi

ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 |"); }
run_step() {  # name, timeout seconds, command...
  local name="$1" limit="$2"; shift 2
  local log="$OUT/$(echo "$name" | tr ' /' '__').log" t0 rc
  t0=$(date +%s)
  timeout "$limit" "$@" > "$log" 2>&1
  rc=$?
  STEP_S=$(( $(date +%s) - t0 )); STEP_RC=$rc; STEP_LOG="$log"
}

# 1. CUDA-only tests (in dry mode they are collected and skipped: the marker and the skip are checked).
run_step "pytest -m cuda" 240 "$PY" -m pytest tests/core -m cuda -q -p no:cacheprovider -rs
summary="$(tail -n 1 "$STEP_LOG")"
row "CUDA-only tests (pytest -m cuda)" "$([[ $STEP_RC -eq 0 ]] && echo ok || echo "FAILED rc=$STEP_RC")" "${STEP_S}s" "$summary"

# 2. Segmenter benchmark, realtime presets, per precision; then dense_clip with its ViT blocks compiled.
bench_rows() {  # label: one row per "segmenter preset size total backbone ratio" line of the step's log
  while IFS= read -r line; do
    set -- $line
    [[ $# -ge 6 && "$3" == *x* && "$4" =~ ^[0-9.]+$ ]] || continue
    fps=$("$PY" -c "print(f'{1000/float($4):.1f}')")
    row "  $1 $2 $3 $LABEL" "${4} ms (${fps} fps)" "backbone ${5} ms" "ratio ${6} (goal <= 1.3)"
  done < "$STEP_LOG"
}
for prec in $PRECISIONS; do
  run_step "bench_segmenters $prec" 240 "$PY" benchmarks/bench_segmenters.py $SEGMENTERS --presets realtime \
    --sizes $SIZES --repeats "$REPEATS" --device "$DEVICE" --precision "$prec" --options "$BENCH_OPTIONS"
  row "bench_segmenters $DEVICE $prec ($SIZES)" "$([[ $STEP_RC -eq 0 ]] && echo ok || echo "FAILED rc=$STEP_RC")" \
    "${STEP_S}s" "see table below"
  LABEL="$prec" bench_rows
done
prec="${PRECISIONS%% *}"
COMPILE_OPTIONS="{compile_blocks: true}"; [[ -n "$BENCH_OPTIONS" ]] && COMPILE_OPTIONS="{${BENCH_OPTIONS:1:-1}, compile_blocks: true}"
run_step "bench_segmenters compiled" 240 "$PY" benchmarks/bench_segmenters.py --segmenters dense_clip \
  --presets realtime --sizes "${SIZES%% *}" --repeats "$REPEATS" --device "$DEVICE" --precision "$prec" \
  --options "$COMPILE_OPTIONS"
row "bench_segmenters dense_clip compile_blocks $prec" "$([[ $STEP_RC -eq 0 ]] && echo ok || echo "FAILED rc=$STEP_RC")" \
  "${STEP_S}s" "first frame compiles; compare with the $prec row above"
LABEL="$prec compiled" bench_rows

# 3. Node stream with a real-size ViT-B/16 at 30 and 60 Hz (the lead's --hz flag when present, else --rate).
HELP="$("$PY" benchmarks/bench_node_stream.py --help 2>&1)"
if grep -q -- "--hz" <<< "$HELP"; then RATE_FLAG="--hz"; NOTE=""; else RATE_FLAG="--rate"; NOTE=" (no --hz flag yet: --rate used)"; fi
MODEL="ViT-B-16-quickgelu"; [[ $DRY -eq 1 ]] && MODEL="ovseg-tiny-vit"
for hz in 30 60; do
  run_step "node_stream ${hz}Hz" 150 "$PY" benchmarks/bench_node_stream.py "$RATE_FLAG" "$hz" --device "$DEVICE" \
    --segmenter dense_clip --preset realtime \
    --model "$MODEL" --frames "$FRAMES" --json "$OUT/node_stream_${hz}.json" --workdir "$OUT/node_stream_work"
  figures="$(grep -iE "processed|e2e latency" "$STEP_LOG" | tr -s " " | tr "\n" " " | cut -c1-200)"
  row "node stream ${hz} Hz $MODEL $DEVICE$NOTE" "$([[ $STEP_RC -eq 0 ]] && echo ok || echo "FAILED rc=$STEP_RC")" \
    "${STEP_S}s" "${figures:-see log} (goal >= 60 fps at 640x480 fp16)"
done

# 4. Numbers the tests measured (VRAM freed, precision agreement).
if [[ -s "$JSONL" ]]; then
  while IFS= read -r line; do
    row "$("$PY" -c "import json,sys; d=json.loads(sys.argv[1]); print(d['check'])" "$line")" measured "" \
      "$("$PY" -c "import json,sys; print(json.loads(sys.argv[1])['value'])" "$line")"
  done < "$JSONL"
fi

# 5. ONNX Runtime backend (issue 18) -- begin ---------------------------------------------------------------
# Torch vs ONNX Runtime per exportable segmenter at 480x640, fp16, one row per execution provider; the first
# ONNX Runtime frame (TensorRT: the engine build, cached in $OUT/trt_cache) is reported apart from the steady
# state. Needs onnxruntime-gpu (README "On a Jetson / robot GPU"); without it the rows say what is missing.
if [[ $DRY -eq 1 ]]; then
  ORT_PROVIDERS="cpu"; ORT_ARGS=(--segmenters dense_clip --size 64x80 --precision fp32 --repeats 1
    --options "{model: {name: ovseg-tiny-vit}, templates: photo}")
else
  ORT_PROVIDERS="cuda tensorrt"; ORT_ARGS=(--size 480x640 --precision fp16 --repeats "$REPEATS")
fi
for prov in $ORT_PROVIDERS; do
  run_step "bench_onnx $prov" 300 "$PY" benchmarks/bench_onnx.py --device "$DEVICE" --providers "$prov" \
    --trt-cache "$OUT/trt_cache" --keep "$OUT/onnx_files" "${ORT_ARGS[@]}"
  row "bench_onnx $DEVICE $prov" "$([[ $STEP_RC -eq 0 ]] && echo ok || echo "FAILED rc=$STEP_RC")" "${STEP_S}s" \
    "$(grep -m1 '^device=' "$STEP_LOG" | cut -c1-160)"
  while IFS= read -r line; do
    set -- $line
    if [[ $# -ge 7 && "$2" =~ ^[0-9.]+$ ]]; then
      row "  $1 onnxruntime $prov" "${3} ms vs torch ${2} ms" "ratio ${4}" \
        "first frame ${5} ms (engine build/load), labels equal ${6}, export ${7} s"
    elif [[ "$2" == "skipped:" ]]; then
      row "  $1 onnxruntime $prov" "skipped" "" "$(echo "$line" | cut -c1-240)"
    fi
  done < "$STEP_LOG"
done
# 5. ONNX Runtime backend (issue 18) -- end -----------------------------------------------------------------

{
  echo "gpu_check $(date -u +%FT%TZ) device: ${CUDA:-none (dry run on CPU)} torch: $("$PY" -c 'import torch; print(torch.__version__)')"
  echo
  echo "| check | status | time | result |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  for f in "$OUT"/*.log; do echo "### $(basename "$f")"; echo '```'; tail -n 40 "$f"; echo '```'; done
} > "$TABLE"
sed -n '1,/^$/p;/^| check/,/^$/p' "$TABLE" | awk 'NR==1 || /^\|/'
echo "gpu_check: table and logs in $TABLE"
fails=$(printf '%s\n' "${ROWS[@]}" | grep -c "FAILED" || true)
exit $(( fails > 0 ? 1 : 0 ))
