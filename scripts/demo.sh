#!/usr/bin/env bash
# The main job, offline, on synthetic data (README's first command): installs the
# build tools a fresh machine lacks, builds tensorbake and runs
# `tensorbake demo --flux` (the PixArt runs and a Flux LoRA). Extra arguments go to
# `tensorbake demo` (e.g. --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f scripts/build-deps.sh ]; then bash scripts/build-deps.sh; fi
# The dev profile: dependencies are optimised there (Cargo.toml), and scripts/test.sh
# reuses the same build.
cargo run --locked -- demo --flux "$@"
