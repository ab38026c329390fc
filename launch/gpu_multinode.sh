#!/usr/bin/env bash
# CIM pre-training on several GPU machines without a scheduler: run this once per process.
#
# Usage (the same line on every node, only --process-id differs):
#   bash launch/gpu_multinode.sh --coordinator=HOST0:PORT --num-processes=N --process-id=I \
#     [--local-device-ids=0,1,...] [--python=PATH] [--dry-run] \
#     --config=configs/cim_pretrain.py:B/16 --workdir=DIR [--config.key=value ...]
#
# One process per node (default): it drives all local GPUs; N = number of nodes, I = node index.
# One process per GPU: start G processes per node with --local-device-ids=g (g = 0..G-1),
# N = nodes x G, I = node x G + g. HOST0 is process 0's machine (reachable from every node);
# PORT any free port there. DIR must be the same shared path (NFS, gs://) on every node.
# The launcher exports JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
# [/ JAX_LOCAL_DEVICE_IDS], which cim_jax.sharding hands to jax.distributed.initialize().
# --dry-run prints the command line instead of running it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/common.sh"
die() { echo "gpu_multinode.sh: error: $*" >&2; exit 2; }

coordinator="" num_processes="" process_id="" local_device_ids="" python=""
train_args=()
for arg in "$@"; do
  case "$arg" in
    --coordinator=*) coordinator="${arg#*=}" ;;
    --num-processes=*) num_processes="${arg#*=}" ;;
    --process-id=*) process_id="${arg#*=}" ;;
    --local-device-ids=*) local_device_ids="${arg#*=}" ;;
    --python=*) python="${arg#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --config=*|--config.*=*|--workdir=*) train_args+=("$arg") ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done
[[ "$coordinator" =~ ^[^:]+:[0-9]+$ ]] || die "--coordinator=HOST:PORT is required (process 0's host), got '$coordinator'"
[[ "$num_processes" =~ ^[0-9]+$ ]] && [ "$num_processes" -ge 1 ] \
  || die "--num-processes must be a positive integer, got '$num_processes'"
[[ "$process_id" =~ ^[0-9]+$ ]] && [ "$process_id" -lt "$num_processes" ] \
  || die "--process-id must be an integer in [0, $num_processes), got '$process_id'"
[[ -z "$local_device_ids" || "$local_device_ids" =~ ^[0-9]+(,[0-9]+)*$ ]] \
  || die "--local-device-ids must look like 0 or 0,1,2,3, got '$local_device_ids'"
printf '%s\n' ${train_args[@]+"${train_args[@]}"} | grep -q '^--workdir=' \
  || die "--workdir=DIR is required (the same shared path on every node)"

cd "$ROOT"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
env_vars=(JAX_COORDINATOR_ADDRESS="$coordinator" JAX_NUM_PROCESSES="$num_processes"
          JAX_PROCESS_ID="$process_id")
[ -n "$local_device_ids" ] && env_vars+=(JAX_LOCAL_DEVICE_IDS="$local_device_ids")
cmd=(env "${env_vars[@]}" "$python" -m cim_jax.pretrain ${train_args[@]+"${train_args[@]}"})
if [ "${DRY_RUN:-0}" = 1 ]; then run_or_print "${cmd[@]}"; else exec "${cmd[@]}"; fi
