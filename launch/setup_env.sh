#!/usr/bin/env bash
# Creates (or reuses) the local virtual environment .venv from a requirements file.
# Usage: source launch/setup_env.sh [requirements file]   (default: requirements.txt)
# Re-installs only when the requirements file changed since the last successful install.
set -euo pipefail
_cim_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_cim_req="${1:-requirements.txt}"
_cim_python="${PYTHON:-python3}"
cd "$_cim_root"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating virtual environment .venv with $($_cim_python --version 2>&1)"
  "$_cim_python" -m venv .venv || { echo "[setup] error: '$_cim_python -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
fi
_cim_stamp=".venv/.installed-$(basename "$_cim_req")"
_cim_hash="$(cat "$_cim_req" requirements.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$_cim_stamp" 2>/dev/null)" != "$_cim_hash" ]; then
  # A first install of the test requirements (torch's CUDA build, libtpu) takes about 7.4 GB in
  # .venv, of the runtime ones about 1 GB: say so up front rather than as pip's "No space left on
  # device" half-way.
  case "$(basename "$_cim_req")" in requirements-test*) _cim_need_gb=8 ;; *) _cim_need_gb=2 ;; esac
  _cim_free_gb=$(( $(df -Pk .venv | awk 'NR==2 {print $4}') / 1048576 ))
  if [ ! -e "$_cim_stamp" ] && [ "$_cim_free_gb" -lt "$_cim_need_gb" ]; then
    echo "[setup] error: installing $_cim_req needs about $_cim_need_gb GB free on the disk of $_cim_root/.venv; $_cim_free_gb GB free" >&2
    exit 1
  fi
  echo "[setup] installing $_cim_req into .venv (first run: about a minute or two)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r "$_cim_req"
  echo "$_cim_hash" > "$_cim_stamp"
fi
export PATH="$_cim_root/.venv/bin:$PATH"
export VIRTUAL_ENV="$_cim_root/.venv"
