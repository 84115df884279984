#!/usr/bin/env bash
# The test command (README): what a new user runs and what CI runs.
# Installs the Python packages the tests use (interop readers, maturin, pytest, torch,
# diffusers, Ray and kubernetes-validate for the scale-out tests) into a private
# virtualenv, runs every test of the workspace, then builds the `tensorbake` Python
# package into that virtualenv and runs its tests. The Slurm test installs Debian's
# slurmctld, slurmd and munge itself (apt, as root) and starts them on loopback
# (docs/scale-out.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-deps.sh
VENV=${TENSORBAKE_TEST_VENV:-$PWD/.venv-test}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# pip skips what is already installed: torch (~3 GB) is downloaded once per venv.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  -r scripts/requirements-test.txt -r scripts/requirements-torch.txt \
  -r scripts/requirements-deploy.txt
export TENSORBAKE_PYTHON="$VENV/bin/python"
# Tests that need that Python fail instead of skipping when this is set.
export TENSORBAKE_REQUIRE_PYTHON=1
cargo test --workspace --locked "$@"

# The Python package (python/, docs/python.md): maturin builds the native module in
# the dev profile (dependencies optimised, shared with the build above) and installs
# the package into the venv in editable mode; pytest runs python/tests against the
# store that `tensorbake demo` writes (the binary built above).
cargo build --locked --bin tensorbake
VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" "$VENV/bin/maturin" develop --locked -q \
  --manifest-path python/Cargo.toml
TENSORBAKE_BIN="$PWD/target/debug/tensorbake" "$VENV/bin/python" -m pytest -q python/tests
