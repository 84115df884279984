"""Synthetic stores for tests and benchmarks, written by tensorbake-store's own writer.

    from tensorbake._testing import write_synthetic_store, PRODUCTION_FEATURES
    write_synthetic_store("bench.zarr", PRODUCTION_FEATURES, parts={"p0": 256})
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from . import _native

#: The design's production shapes at 512 px: SD latent moments (f32), SigLIP so400m,
#: T5-XXL at 120 tokens (bf16), the T5 token count.
PRODUCTION_FEATURES: Mapping[str, tuple[str, Sequence[int]]] = {
    "sd_vae_mean": ("float32", (4, 64, 64)),
    "sd_vae_std": ("float32", (4, 64, 64)),
    "siglip_hidden": ("bfloat16", (729, 1152)),
    "t5_hidden": ("bfloat16", (120, 4096)),
    "t5_len": ("uint32", ()),
}

#: One small feature of every dtype tensorbake writes.
EVERY_DTYPE: Mapping[str, tuple[str, Sequence[int]]] = {
    "emb_bf16": ("bfloat16", (5, 7)),
    "lat_f16": ("float16", (2, 3, 3)),
    "lat_f32": ("float32", (2, 3, 3)),
    "ids_u16": ("uint16", (6,)),
    "len_u32": ("uint32", ()),
}


def spec(features: Mapping[str, tuple[str, Sequence[int]]], resolution: int | None = 512) -> dict:
    """A store spec with these `{name: (dtype, shape)}` features."""
    return {
        "format_version": 1,
        "features": {
            name: {
                "model": f"synthetic/{name}",
                "weights_sha256": "0" * 64,
                "preprocess": {"synthetic": True},
                "dtype": dtype,
                "shape": list(shape),
            }
            for name, (dtype, shape) in features.items()
        },
        "captions": {"clean": True, "strip_boilerplate": True},
        "resolution": resolution,
        "metadata": {"dataset": "synthetic"},
    }


def write_synthetic_store(
    location: str | os.PathLike,
    features: Mapping[str, tuple[str, Sequence[int]]],
    parts: Mapping[str, int],
    *,
    uncommitted: Mapping[str, int] | None = None,
    null_arrays: Sequence[str] = (),
    seed: int = 0,
    shard_bytes: int | None = None,
) -> str:
    """Writes seeded samples (roughly N(0,1) floats, random integers, varied captions)
    into a new store; returns its location."""
    loc = os.fspath(location)
    _native.write_synthetic(
        loc,
        json.dumps(spec(features)),
        list(parts.items()),
        list((uncommitted or {}).items()),
        list(null_arrays),
        seed,
        shard_bytes,
    )
    return loc
