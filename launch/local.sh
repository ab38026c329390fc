#!/usr/bin/env bash
# The README's main job: set up .venv, then CIM pre-training on this machine.
# Usage: bash launch/local.sh [--config=configs/demo.py] [--workdir=workdirs/demo] [--config.key=value ...]
# Defaults: the embedded demo (configs/demo.py) into workdirs/demo. Re-running resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh requirements.txt
args=("$@")
printf '%s\n' "${args[@]}" | grep -q -- '^--config=' || args=(--config=configs/demo.py "${args[@]}")
printf '%s\n' "${args[@]}" | grep -q -- '^--workdir=' || args+=(--workdir=workdirs/demo)
exec python -m cim_jax.pretrain "${args[@]}"
