"""examples/train_pixart_from_store.py trains a tiny PixArt from the demo store for a
few steps through StoreIterableDataset, in both modes, and the loss falls."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, require

EXAMPLE = REPO / "examples" / "train_pixart_from_store.py"


def _train(tmp_path, name, *args):
    log = tmp_path / f"{name}.json"
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), *args, "--device", "cpu", "--num-workers", "2",
         "--log-json", str(log)],
        capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    print(run.stdout)
    return json.loads(log.read_text())


def test_the_pixart_example_overfits_the_demo_store_in_text_and_redux_mode(demo_store, tmp_path):
    require("torch")
    require("diffusers")
    text = _train(tmp_path, "text", "--store", str(demo_store), "--mode", "text", "--tiny",
                  "--steps", "60", "--batch-size", "6", "--lr", "1e-3", "--cond-dropout", "0.1",
                  "--save", str(tmp_path / "pixart"))
    assert text["steps"] == 60
    assert text["last_mean"] < 0.8 * text["first_mean"], text
    assert text["eval_end"] < 0.8 * text["eval_start"], text
    assert (tmp_path / "pixart" / "transformer" / "config.json").is_file()

    # Redux adapter on a frozen (random) PixArt: only the adapter learns, and the loss
    # still falls (the adapter's x0.04 output wants a larger step size).
    redux = _train(tmp_path, "redux", "--store", str(demo_store), "--mode", "redux", "--tiny",
                   "--steps", "60", "--batch-size", "6", "--lr", "1e-2", "--cond-dropout", "0.1")
    assert redux["steps"] == 60
    assert redux["frozen_checksum_start"] == redux["frozen_checksum_end"], redux
    assert redux["trainable_parameters"] == redux["adapter_parameters"] > 0, redux
    assert redux["last_mean"] < 0.95 * redux["first_mean"], redux
    assert redux["eval_end"] < 0.95 * redux["eval_start"], redux
