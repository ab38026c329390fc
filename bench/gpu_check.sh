#!/usr/bin/env bash
# One short GPU check: ViT-B/16 bf16 train step at DESIGN.md sizes, XLA vs cuDNN attention.
#
#   OUT=/some/dir bash bench/gpu_check.sh              # GPU machine, from the repo root; ~2 min
#   OUT=/tmp/out bash bench/gpu_check.sh --cpu-smoke   # same script on CPU, tiny cases (a typo
#                                                      # check before spending device time)
# Prints device, jax/cuDNN versions, then step time / samples/s / MFU for batch 512 with
# attention xla and cudnn side by side; then batch 1024 with the faster kernel if time is left.
# Everything printed also goes to $OUT/gpu_check.txt. Wheels in .whl/ (carried, git-ignored)
# supply the packages the GPU image lacks.
set -o pipefail

cd "$(dirname "$0")/.." || exit 1
: "${OUT:?set OUT to the folder for gpu_check.txt}"
mkdir -p "$OUT" || exit 1
export PYTHONUNBUFFERED=1
SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
PYTHON=${PYTHON:-python3}

# Hard wall-clock budget (s) for everything below, compiles included.
BUDGET=${GPU_CHECK_BUDGET:-140}

main() {
  local start=$SECONDS
  if (( SMOKE )); then
    export JAX_PLATFORMS=cpu
    local cases="Ti/16:2" big="Ti/16:4" dtype=float32 steps=1
  else
    local cases="B/16:512" big="B/16:1024" dtype=bfloat16 steps=10
    if compgen -G ".whl/*.whl" > /dev/null; then
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || echo "== warning: installing .whl/*.whl failed"
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  fi
  local common=(--dtype="$dtype" --steps="$steps" --rounds=1 --no_torch --no-pipeline)

  echo "== $cases: attention xla vs cudnn (budget ${BUDGET}s)"
  local main_log
  main_log=$(mktemp)
  timeout $(( BUDGET - 20 )) "$PYTHON" bench/bench_step.py --cases="$cases" \
    --attention_impl=xla,cudnn "${common[@]}" | tee "$main_log"
  local rc=$?
  (( rc == 124 )) && echo "== $cases: cut off at $(( BUDGET - 20 ))s"

  # The faster kernel of the first run (lowest s/step among the rows that ran) for the big batch.
  local best
  best=$(awk '$3 == "xla" || $3 == "cudnn" { if ($4 ~ /^[0-9.]+$/ && (t == "" || $4 < t)) { t = $4; k = $3 } }
              END { print k }' "$main_log")
  rm -f "$main_log"
  local left=$(( BUDGET - (SECONDS - start) ))
  if [[ -n "$best" ]] && (( left >= 45 )); then
    echo "== $big: attention $best (${left}s left)"
    timeout "$left" "$PYTHON" bench/bench_step.py --cases="$big" --attention_impl="$best" \
      "${common[@]}"
    (( $? == 124 )) && echo "== $big: cut off at the time budget"
  else
    echo "== $big: skipped (${left}s left, faster kernel: ${best:-none})"
  fi
  echo "== done in $(( SECONDS - start ))s"
  return $rc
}

main 2>&1 | tee "$OUT/gpu_check.txt"
exit "${PIPESTATUS[0]}"
