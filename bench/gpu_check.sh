#!/usr/bin/env bash
# One GPU call: ViT-B/16 bf16 train step at the recipe's sizes (docs/METHOD.md), kernel/flag variants side by side,
# then a profile of the fastest one.
#
#   OUT=/some/dir bash bench/gpu_check.sh              # GPU machine, from the repo root; <= 8 min
#   OUT=/tmp/out bash bench/gpu_check.sh --cpu-smoke   # same script on CPU, tiny case (a typo
#                                                      # check before spending device time)
# Each variant runs in its own process (XLA_FLAGS are read once, at backend start) with its own
# time limit, so a flag this XLA does not know or a kernel that fails costs one row, not the run.
# The first row, XLA attention with no flags, is the baseline the others compare with. Then the
# fastest variant is profiled and its kernel time summarised by kind (bench/profile_summary.py),
# and, if time is left, run at the largest batch that fits (doubling from 1024).
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

# Hard wall-clock budget (s) for everything below, compiles included; per variant at most PER.
BUDGET=${GPU_CHECK_BUDGET:-480}
PER=${GPU_CHECK_PER_VARIANT:-90}

# label | XLA_FLAGS | bench_step.py arguments
# (--xla_gpu_enable_cublaslt and --xla_gpu_enable_cudnn_layer_norm are left out: compiled for an
# H100 by bench/gpu_aot.py, the step is the same program with and without them, cuBLASLt with
# bias epilogues already being the default.)
VARIANTS=(
  "xla|   |--attention_impl=xla"
  "cudnn|   |--attention_impl=cudnn"
  "cudnn+no_triton_gemm|--xla_gpu_enable_triton_gemm=false|--attention_impl=cudnn"
  "cudnn+triton_gemm_any|--xla_gpu_triton_gemm_any=true|--attention_impl=cudnn"
)
# After these: 'cudnn+combined', the flags of every 'cudnn+...' row faster than 'cudnn' together
# (when two or more were), then a profile of the fastest row, then the largest batch.
# (No tanh-GELU row: with the exact GELU's backward recomputed from its input (vit.exact_gelu),
# gpu_aot.py estimates model.approximate_gelu=true at 98.7 ms/step against 97.9 for the recipe.)

trim() { local s="$1"; s="${s#"${s%%[![:space:]]*}"}"; echo "${s%"${s##*[![:space:]]}"}"; }

faster() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }

# run_variant LABEL XLA_FLAGS ARGS: one bench_step.py process; sets last_time to its s/step ('' if
# it gave none) and keeps the fastest row in best_*.
run_variant() {
  local label=$1 flags=$2 args=$3 left log t
  last_time=""
  # CPU smoke run: XLA attention in place of cuDNN, so every step of the script runs
  # (GPU_CHECK_SMOKE_CUDNN=1 keeps cuDNN, whose rows then fail: the fallback path).
  (( SMOKE && ! ${GPU_CHECK_SMOKE_CUDNN:-0} )) && args=${args//--attention_impl=cudnn/--attention_impl=xla}
  left=$(( BUDGET - (SECONDS - start) ))
  if (( left < 30 )); then
    echo "== $label: skipped (${left}s of the budget left)"
    return
  fi
  echo "== $label: XLA_FLAGS='$flags' $args"
  log=$(mktemp)
  # shellcheck disable=SC2086  (args: several words)
  XLA_FLAGS="$flags" timeout $(( left < PER ? left : PER )) \
    "$PYTHON" bench/bench_step.py "${common[@]}" $args 2>&1 | tee "$log" | grep -v "^WARNING"
  (( ${PIPESTATUS[0]} == 124 )) && echo "== $label: cut off at the time limit"
  # s/step of the result row: the first decimal number after "VARIANT bBATCH".
  t=$(awk '/^[A-Za-z]+\/[0-9]+ b[0-9]+/ { for (i = 3; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+$/) { print $i; exit } }' "$log")
  rm -f "$log"
  if [[ -n "$t" ]] && { [[ -z "$best_time" ]] || faster "$t" "$best_time"; }; then
    best_label=$label best_time=$t best_flags=$flags best_args=$args
  fi
  last_time=$t
}

# on_base: a 'cudnn+...' variant (label, args of the caller) moved onto XLA attention when the
# cudnn row gave no time (base=xla).
on_base() {
  if [[ "$label" == cudnn+* && "$base" == xla ]]; then
    label="xla+${label#cudnn+}" args=${args//--attention_impl=cudnn/--attention_impl=xla}
  fi
}

main() {
  local start=$SECONDS case dtype steps
  if (( SMOKE )); then
    export JAX_PLATFORMS=cpu
    case="Ti/16:2" dtype=float32 steps=1
  else
    case="B/16:512" dtype=bfloat16 steps=10
    if compgen -G ".whl/*.whl" > /dev/null; then
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || echo "== warning: installing .whl/*.whl failed"
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  fi
  local common=(--cases="$case" --dtype="$dtype" --steps="$steps" --rounds=1 --no_torch
                --no-pipeline)
  echo "== $case, $dtype: ${#VARIANTS[@]} variants, ${PER}s each at most (budget ${BUDGET}s)"

  # The flag rows use cuDNN attention, or XLA attention if the cuDNN row gave no time.
  local spec label flags args left t base=cudnn base_time="" xla_time="" combined=""
  best_label="" best_time="" best_flags="" best_args=""
  for spec in "${VARIANTS[@]}"; do
    IFS='|' read -r label flags args <<< "$spec"
    label=$(trim "$label") flags=$(trim "$flags") args=$(trim "$args")
    on_base
    run_variant "$label" "$flags" "$args"
    t=$last_time
    case "$label" in
      xla) xla_time=$t ;;
      cudnn)
        base_time=$t
        if [[ -z "$t" ]]; then
          base=xla base_time=$xla_time
          echo "== the cudnn row gave no time: the flag rows use XLA attention"
        fi ;;
      *) if [[ -n "$t" && -n "$base_time" ]] && faster "$t" "$base_time"; then
           combined="$combined $flags"
         fi ;;
    esac
  done
  combined=$(trim "$combined")
  if [[ "$combined" == *" "* ]]; then
    run_variant "$base+combined" "$combined" "--attention_impl=$base"
  fi
  echo "== fastest: ${best_label:-none} (${best_time:-n/a} s/step)"

  left=$(( BUDGET - (SECONDS - start) ))
  if [[ -n "$best_label" ]] && (( left >= 45 )); then
    echo "== profile of $best_label (${left}s left)"
    rm -rf "$OUT/trace"
    # shellcheck disable=SC2086
    XLA_FLAGS="$best_flags" timeout "$left" "$PYTHON" bench/bench_step.py "${common[@]}" \
      $best_args --profile="$OUT/trace" 2>&1 | grep -v "^WARNING"
    "$PYTHON" bench/profile_summary.py "$OUT/trace" --top=20
  else
    echo "== profile skipped (${left}s left)"
  fi

  # The issue's case is the largest batch that fits: double from 1024 with the fastest variant.
  left=$(( BUDGET - (SECONDS - start) ))
  if [[ -n "$best_label" ]] && (( left >= 90 )); then
    local big_case="B/16:1024" cap=0
    (( SMOKE )) && big_case="Ti/16:4" cap=8
    echo "== largest batch from ${big_case#*:}, $best_label (${left}s left)"
    # shellcheck disable=SC2086
    XLA_FLAGS="$best_flags" timeout "$left" "$PYTHON" bench/bench_step.py "${common[@]}" \
      --cases="$big_case" --max_batch --max_batch_cap="$cap" $best_args 2>&1 | grep -v "^WARNING"
    (( ${PIPESTATUS[0]} == 124 )) && echo "== largest batch: cut off at the time budget"
  else
    echo "== largest batch skipped (${left}s left)"
  fi

  echo "== done in $(( SECONDS - start ))s"
  [[ -n "$best_label" ]]
}

main 2>&1 | tee "$OUT/gpu_check.txt"
exit "${PIPESTATUS[0]}"
