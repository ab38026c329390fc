#!/usr/bin/env bash
# The README's test command: set up .venv with the test requirements, then run pytest.
# Extra arguments go to pytest (e.g. `bash launch/test.sh -m slow`, `bash launch/test.sh -k pairs`).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh requirements-test.txt
exec python -m pytest -q "$@"
