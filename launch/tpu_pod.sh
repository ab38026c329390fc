#!/usr/bin/env bash
# CIM pre-training on a Cloud TPU VM slice: create or reuse the slice, ship the code, install the
# pinned requirements on every worker, start the same `python -m cim_jax.pretrain` everywhere.
#
# Usage:
#   bash launch/tpu_pod.sh --name=cim-b16 --zone=us-central2-b --accelerator-type=v4-64 \
#     --workdir=gs://BUCKET/runs/cim_b16 --data-dir=gs://BUCKET/tensorflow_datasets \
#     [--config=configs/cim_pretrain.py:B/16] [--version=RUNTIME] [--project=P] \
#     [--spot|--preemptible] [--repo=GIT_URL [--ref=REF]] [--skip-install] [--detach] \
#     [--max-restarts=N] [--dry-run] [--skip-compile-check] \
#     [--config.key=value ...]
#
# Every worker runs the same command; JAX finds the slice's hosts itself and the trainer resumes
# from the last checkpoint in --workdir, so re-running this script after a preemption (or
# --max-restarts=N, which re-creates a PREEMPTED slice and starts again) continues the run.
# --dry-run prints each command (one per line, prefixed with "+ ", shell-quoted) instead of
# running it; it needs neither gcloud nor credentials.
# Before touching the slice (dry run included), the train step is compiled for it on this machine
# (`python -m cim_jax.tools.compile_for`, libtpu: `pip install jax[tpu]`, no TPU needed); a config
# that does not compile or fit stops here. --skip-compile-check skips that pre-flight.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/common.sh"
die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

name="" zone="" accelerator="" runtime="" project="" config="configs/cim_pretrain.py:B/16"
workdir="" data_dir="" provisioning="" repo="" ref="main" skip_install=0 detach=0
max_restarts=0 overrides=() compile_check=1
for arg in "$@"; do
  case "$arg" in
    --name=*) name="${arg#*=}" ;;
    --zone=*) zone="${arg#*=}" ;;
    --accelerator-type=*) accelerator="${arg#*=}" ;;
    --version=*) runtime="${arg#*=}" ;;
    --project=*) project="${arg#*=}" ;;
    --config=*) config="${arg#*=}" ;;
    --workdir=*) workdir="${arg#*=}" ;;
    --data-dir=*) data_dir="${arg#*=}" ;;
    --spot) provisioning="--spot" ;;
    --preemptible) provisioning="--preemptible" ;;
    --repo=*) repo="${arg#*=}" ;;
    --ref=*) ref="${arg#*=}" ;;
    --skip-install) skip_install=1 ;;
    --detach) detach=1 ;;
    --max-restarts=*) max_restarts="${arg#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --skip-compile-check) compile_check=0 ;;
    --config.*=*) overrides+=("$arg") ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done
[ -n "$name" ] || die "--name=TPU_NAME is required"
[ -n "$zone" ] || die "--zone=ZONE is required (e.g. us-central2-b for v4)"
[ -n "$accelerator" ] || die "--accelerator-type is required (e.g. v4-64, v5p-64, v5litepod-64)"
[ -n "$workdir" ] || die "--workdir is required (a gs:// path: every worker writes checkpoints there)"
case "$workdir" in gs://*) ;; *) die "--workdir=$workdir must be a gs:// path shared by all workers" ;; esac
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max-restarts=$max_restarts must be a number >= 0"
# A config is FILE or FILE:ARG (get_config's argument, e.g. the ViT variant).
[ -f "$ROOT/${config%%:*}" ] || die "config file not found: ${config%%:*} (paths are relative to the repository root)"

# The runtime image per TPU generation (Cloud TPU docs); --version overrides it.
if [ -z "$runtime" ]; then
  case "$accelerator" in
    v4-*) runtime="tpu-ubuntu2204-base" ;;
    v5p-*) runtime="v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) runtime="v2-alpha-tpuv5-lite" ;;
    v6e-*) runtime="v2-alpha-tpuv6e" ;;
    *) die "no default runtime for --accelerator-type=$accelerator; pass --version=RUNTIME" ;;
  esac
fi

# The same jax as requirements.txt, with the TPU plugin; gcsfs lets etils.epath (TFDS metadata,
# orbax checkpoints) reach gs:// without tensorflow.
jax_version="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$ROOT/requirements.txt")"
[ -n "$jax_version" ] || die "requirements.txt pins no jax==VERSION"
extra_pins=("jax[tpu]==$jax_version")
grep -q '^gcsfs==' "$ROOT/requirements.txt" || extra_pins+=("gcsfs==2026.10.1")
install_hash="$( (cat "$ROOT/requirements.txt"; printf '%s\n' "${extra_pins[@]}") | cksum | cut -d' ' -f1)"

gcloud_tpu=(gcloud compute tpus tpu-vm)
scope=(--zone="$zone")
[ -n "$project" ] && scope+=(--project="$project")
remote_dir='~/cim-jax'  # expanded by the remote shell
venv='~/cim-venv'

on_all_workers() { run_or_print "${gcloud_tpu[@]}" ssh "$name" "${scope[@]}" --worker=all --command="$1"; }

tpu_state() {  # READY, CREATING, PREEMPTED, ... or NOT_FOUND
  "${gcloud_tpu[@]}" describe "$name" "${scope[@]}" --format='value(state)' 2>/dev/null || echo NOT_FOUND
}

ensure_tpu() {
  local create=("${gcloud_tpu[@]}" create "$name" "${scope[@]}" --accelerator-type="$accelerator"
                --version="$runtime")
  [ -n "$provisioning" ] && create+=("$provisioning")
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "# create the slice unless 'describe' finds it READY (a PREEMPTED one is deleted first)"
    run_or_print "${gcloud_tpu[@]}" describe "$name" "${scope[@]}" --format='value(state)'
    run_or_print "${create[@]}"
    return
  fi
  local state
  for _ in $(seq 1 120); do
    state="$(tpu_state)"
    case "$state" in
      READY) echo "[tpu] reusing $name ($accelerator, READY)"; return ;;
      NOT_FOUND) echo "[tpu] creating $name ($accelerator, $runtime ${provisioning:-on-demand})"
                 "${create[@]}"; return ;;
      PREEMPTED|TERMINATED|FAILED)
        echo "[tpu] $name is $state: deleting and re-creating it"
        "${gcloud_tpu[@]}" delete "$name" "${scope[@]}" --quiet; "${create[@]}"; return ;;
      STOPPED) "${gcloud_tpu[@]}" start "$name" "${scope[@]}"; return ;;
      *) echo "[tpu] $name is $state; waiting"; sleep 30 ;;
    esac
  done
  die "$name did not become READY (last state: $state)"
}

ship_code() {
  if [ -n "$repo" ]; then
    # FETCH_HEAD: a branch, a tag or a commit, as it is on the remote now.
    on_all_workers "set -e; [ -d $remote_dir/.git ] || git clone -q $(quote "$repo") $remote_dir; \
git -C $remote_dir fetch -q origin $(quote "$ref"); git -C $remote_dir checkout -q FETCH_HEAD"
    return
  fi
  # The working tree as git sees it (tracked + untracked, not ignored): no .venv, no workdirs.
  local archive="${TMPDIR:-/tmp}/cim-jax-code-$name.tgz"
  if git -C "$ROOT" rev-parse --git-dir > /dev/null 2>&1; then
    run_or_print bash -c "cd $(quote "$ROOT") && git ls-files -z --cached --others --exclude-standard \
| tar --null -T - -czf $(quote "$archive")"
  else
    run_or_print tar -C "$ROOT" --exclude=.venv --exclude=workdirs -czf "$archive" .
  fi
  run_or_print "${gcloud_tpu[@]}" scp "$archive" "$name:cim-jax-code.tgz" "${scope[@]}" --worker=all
  on_all_workers "set -e; rm -rf $remote_dir; mkdir -p $remote_dir; \
tar -xzf ~/cim-jax-code.tgz -C $remote_dir"
}

install_requirements() {
  # uv provides a Python >= 3.11 where the runtime image ships an older one (Ubuntu 22.04 has
  # 3.10); --break-system-packages only where the image's pip refuses user installs (PEP 668).
  # The stamp skips the install on restarts when nothing changed.
  on_all_workers "set -e; cd $remote_dir; \
if [ \"\$(cat $venv/.installed 2>/dev/null)\" != $install_hash ]; then \
python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv; \
[ -x $venv/bin/python ] || ~/.local/bin/uv venv -q --python 3.11 $venv; \
~/.local/bin/uv pip install -q --python $venv/bin/python -r requirements.txt $(quote "${extra_pins[@]}") ; \
echo $install_hash > $venv/.installed; fi"
}

start_training() {
  local args=(--config="$config" --workdir="$workdir")
  [ -n "$data_dir" ] && args+=(--config.data.source=tfds --config.data.tfds_data_dir="$data_dir")
  args+=(${overrides[@]+"${overrides[@]}"})  # last: a user override wins over the defaults above
  local cmd="cd $remote_dir && $venv/bin/python -m cim_jax.pretrain $(quote "${args[@]}")"
  if [ "$detach" = 1 ]; then
    on_all_workers "nohup bash -c $(quote "$cmd")>> ~/cim-train.log 2>&1 < /dev/null &"
  else
    on_all_workers "set -o pipefail; $cmd 2>&1 | tee -a ~/cim-train.log"
  fi
}

preflight_compile() {  # the real step compiled for the slice here: does it fit, what will it cost?
  local args=(--target="$accelerator" --config="$config")
  args+=(${overrides[@]+"${overrides[@]}"})
  echo "# pre-flight: compile the train step for $accelerator on this machine (--skip-compile-check skips it)"
  echo "+ $(quote "${PYTHON:-python3}" -m cim_jax.tools.compile_for "${args[@]}")"
  (cd "$ROOT" && "${PYTHON:-python3}" -m cim_jax.tools.compile_for "${args[@]}") ||
    die "pre-flight: the train step does not compile or fit on $accelerator (see above); nothing was created"
}

[ "$compile_check" = 1 ] && preflight_compile
attempt=0
while true; do
  ensure_tpu
  ship_code
  [ "$skip_install" = 1 ] || install_requirements
  status=0
  start_training || status=$?
  [ "$status" = 0 ] && break
  attempt=$((attempt + 1))
  state="$(tpu_state)"
  if [ "$state" != PREEMPTED ] || [ "$attempt" -gt "$max_restarts" ]; then
    echo "[tpu] training exited with status $status (slice state: $state)" >&2
    exit "$status"
  fi
  echo "[tpu] $name was preempted; restart $attempt/$max_restarts resumes from $workdir"
done
[ "${DRY_RUN:-0}" = 1 ] || echo "[tpu] done; delete the slice with: $(quote "${gcloud_tpu[@]}" delete "$name" "${scope[@]}")"
