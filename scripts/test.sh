#!/usr/bin/env bash
# The test command (README): what a new user runs and what CI runs.
# Installs the Python packages the interop tests read stores with into a private
# virtualenv, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-deps.sh
VENV=${TENSORBAKE_TEST_VENV:-$PWD/.venv-test}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r scripts/requirements-test.txt
export TENSORBAKE_PYTHON="$VENV/bin/python"
# Tests that need that Python fail instead of skipping when this is set.
export TENSORBAKE_REQUIRE_PYTHON=1
cargo test --workspace --locked "$@"
