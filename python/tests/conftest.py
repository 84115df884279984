"""Fixtures of the Python tests (run by scripts/test.sh: `python -m pytest python/tests`).

The demo store is made by the `tensorbake` binary (`tensorbake demo`: synthetic SA-1B
over loopback HTTP, tiny random-weight encoders, the whole pipeline into a store):
$TENSORBAKE_BIN, else target/debug/tensorbake; $TENSORBAKE_DEMO_STORE reuses an
existing store instead. Tests that need torch, diffusers, zarr, tensorstore or moto
skip with a message when those are missing, unless TENSORBAKE_REQUIRE_PYTHON=1
(scripts/test.sh sets it), where they fail.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STORE_PY = REPO / "store" / "python"


def require(module: str):
    """Imports `module`, or skips the test (fails under TENSORBAKE_REQUIRE_PYTHON=1)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("TENSORBAKE_REQUIRE_PYTHON") == "1":
            pytest.fail(f"{module} is needed (TENSORBAKE_REQUIRE_PYTHON=1): {e}")
        pytest.skip(f"{module} is not installed (pip install -r scripts/requirements-test.txt "
                    f"-r scripts/requirements-torch.txt)")


def tensorbake_bin() -> Path:
    b = os.environ.get("TENSORBAKE_BIN")
    path = Path(b) if b else REPO / "target" / "debug" / "tensorbake"
    if not path.is_file():
        pytest.fail(f"the tensorbake binary {path} is missing: `cargo build --bin tensorbake` "
                    "or set TENSORBAKE_BIN")
    return path


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory) -> Path:
    """A store written by `tensorbake demo`: 3 parts of 6 samples at 64 px."""
    given = os.environ.get("TENSORBAKE_DEMO_STORE")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("demo") / "demo"
    run = subprocess.run(
        [str(tensorbake_bin()), "demo", "--out", str(out), "--shards", "3",
         "--images-per-shard", "6", "--resolution", "64"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, f"tensorbake demo failed:\n{run.stdout}\n{run.stderr}"
    return out / "store"


@pytest.fixture()
def store_copy(demo_store, tmp_path) -> Path:
    """A private copy of the demo store, to damage."""
    dst = tmp_path / "store"
    shutil.copytree(demo_store, dst)
    return dst


@pytest.fixture(scope="session")
def zarr_python():
    """zarr-python with the bfloat16 data type registered (store/python/tensorbake_zarr.py)."""
    zarr = require("zarr")
    require("ml_dtypes")
    sys.path.insert(0, str(STORE_PY))
    importlib.import_module("tensorbake_zarr")
    return zarr
