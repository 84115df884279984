"""Reader benchmark: tensorbake (Python) beside tensorstore and zarr-python on the same
store in the same run, plus a torch DataLoader fed by StoreIterableDataset.

    python python/bench/bench_reader.py --store demo/store            # an existing store
    python python/bench/bench_reader.py --synthetic /tmp/tb-bench      # production shapes

``--synthetic DIR`` writes (once) a store of the design's 512 px shapes with
tensorbake-store's writer: SigLIP so400m [729, 1152] bf16, T5-XXL@120 [120, 4096] bf16,
SD latent moments 2 x [4, 64, 64] f32, ``t5_len``; seeded N(0,1)-like values.

Measured, each reader on the same random samples (page cache warm, after a warm-up;
``--rounds`` rounds with the readers interleaved, the best round reported):
- random single samples/s: one sample of every ``--features`` array per read;
- shuffled batches of ``--batch-size``/s: a batch of random samples stacked into one
  array per feature (tensorbake: ``get_batch``; tensorstore: all reads issued, then
  awaited; zarr-python: ``oindex`` per part, concurrently inside zarr);
- DataLoader samples/s: ``StoreIterableDataset(batch_size)`` with ``--workers`` workers
  and with none (the dataset's prefetch thread), steady state (after the first batch).
Prints a Markdown table (and ``--json``). Needs numpy, ml_dtypes, tensorstore, zarr,
google-crc32c, torch for the DataLoader row (scripts/requirements-test.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

import tensorbake

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2] / "store" / "python"))

DEFAULT_FEATURES = ["siglip_hidden", "t5_hidden", "sd_vae_mean", "sd_vae_std"]


def synthetic_store(dir_: Path, samples: int) -> Path:
    from tensorbake._testing import PRODUCTION_FEATURES, write_synthetic_store

    loc = dir_ / f"production-{samples}.zarr"
    if not (loc / "zarr.json").exists():
        half = samples // 2
        t0 = time.perf_counter()
        write_synthetic_store(loc, PRODUCTION_FEATURES, {"p0": half, "p1": samples - half}, seed=1)
        print(f"wrote {loc} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return loc


def rate(fn, items: int) -> float:
    t0 = time.perf_counter()
    fn()
    return items / (time.perf_counter() - t0)


def bench_tensorbake(store, features, singles, batches, threads):
    store.sample(int(singles[0]), features)
    store.get_batch(batches[0], features)

    def one():
        for i in singles:
            store.sample(int(i), features)

    def many():
        for b in batches:
            store.get_batch(b, features, threads=threads)

    return one, many


def bench_tensorstore(store, features, singles, batches):
    import tensorstore as ts

    ctx = ts.Context()
    opened = {
        (p.name, a): ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                              "path": os.path.join(store.location, "parts", p.name, a)}},
                             context=ctx).result()
        for p in store.parts if p.samples for a in features
    }
    loc = [store.locate(int(i)) for i in range(len(store))]

    def read_one(i):
        part, row = loc[i]
        return [opened[(part.name, a)][row].read().result() for a in features]

    def read_batch(idx):
        futs = {a: [opened[(loc[i][0].name, a)][loc[i][1]].read() for i in idx] for a in features}
        return {a: np.stack([f.result() for f in fs]) for a, fs in futs.items()}

    read_one(int(singles[0]))
    read_batch(batches[0])

    def one():
        for i in singles:
            read_one(int(i))

    def many():
        for b in batches:
            read_batch(b)

    return one, many


def bench_zarr(store, features, singles, batches):
    import tensorbake_zarr  # noqa: F401  (registers bfloat16)
    import zarr

    root = zarr.open_group(store.location, mode="r")
    opened = {(p.name, a): root["parts"][p.name][a] for p in store.parts if p.samples for a in features}
    loc = [store.locate(int(i)) for i in range(len(store))]

    def read_one(i):
        part, row = loc[i]
        return [opened[(part.name, a)][row] for a in features]

    def read_batch(idx):
        out = {}
        by_part = {}
        for j, i in enumerate(idx):
            by_part.setdefault(loc[i][0].name, []).append((loc[i][1], j))
        for a in features:
            info = store.arrays[a]
            dst = np.empty((len(idx), *info.shape), dtype=info.dtype)
            for part, rows in by_part.items():
                rows.sort()
                got = opened[(part, a)].oindex[[r for r, _ in rows]]
                dst[[j for _, j in rows]] = got
            out[a] = dst
        return out

    read_one(int(singles[0]))
    read_batch(batches[0])

    def one():
        for i in singles:
            read_one(int(i))

    def many():
        for b in batches:
            read_batch(b)

    return one, many


def bench_dataloader(store, features, batch_size, workers, min_batches):
    import torch
    from torch.utils.data import DataLoader

    from tensorbake.torch import StoreIterableDataset

    ds = StoreIterableDataset(store, features, batch_size=batch_size, seed=0)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    samples, t0, epoch, seen = 0, None, 0, 0
    while seen < min_batches + 1:
        ds.set_epoch(epoch)  # persistent workers keep their epoch; fine for throughput
        for b in loader:
            seen += 1
            if t0 is None:
                t0 = time.perf_counter()
                continue
            samples += len(b["key"])
        epoch += 1
    del torch
    return samples / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--store", help="an existing tensorbake store (local)")
    g.add_argument("--synthetic", help="directory for a production-shaped synthetic store")
    p.add_argument("--samples", type=int, default=256, help="samples of the synthetic store")
    p.add_argument("--features", default=",".join(DEFAULT_FEATURES))
    p.add_argument("--reads", type=int, default=300, help="random single-sample reads per reader")
    p.add_argument("--batches", type=int, default=20, help="shuffled batches per reader")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--threads", type=int, default=0, help="tensorbake read threads per batch (0: auto)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (readers interleaved); the best is reported")
    p.add_argument("--skip", default="", help="comma list of readers to skip: tensorstore,zarr,dataloader")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    loc = Path(args.store) if args.store else synthetic_store(Path(args.synthetic), args.samples)
    store = tensorbake.open(loc)
    features = [f for f in args.features.split(",") if f in store.arrays]
    n = len(store)
    rng = np.random.default_rng(0)
    singles = rng.integers(0, n, size=args.reads)
    order = np.concatenate([rng.permutation(n) for _ in range(-(-args.batches * args.batch_size // n))])
    batches = [order[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.batches)]
    sample_bytes = sum(store.arrays[f].sample_bytes for f in features)
    # page cache warm: one pass over everything
    for start in range(0, n, 64):
        store.get_batch(range(start, min(n, start + 64)), features)

    skip = set(filter(None, args.skip.split(",")))
    readers = {"tensorbake": bench_tensorbake(store, features, singles, batches, args.threads)}
    if "tensorstore" not in skip:
        readers["tensorstore"] = bench_tensorstore(store, features, singles, batches)
    if "zarr" not in skip:
        readers["zarr-python"] = bench_zarr(store, features, singles, batches)
    # Rounds, the readers interleaved, best of the rounds: the others' load on a shared
    # machine hits every reader alike instead of whichever ran during a busy spell.
    rows = {name: (0.0, 0.0) for name in readers}
    for _ in range(args.rounds):
        for name, (one, many) in readers.items():
            r1 = rate(one, len(singles))
            r2 = rate(many, len(batches))
            rows[name] = (max(rows[name][0], r1), max(rows[name][1], r2))
    dl = {}
    if "dataloader" not in skip:
        for workers in dict.fromkeys([args.workers, 0]):
            dl[workers] = bench_dataloader(store, features, args.batch_size, workers, max(args.batches, 10))

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"store {store.location}: {n} samples, features {', '.join(features)}, "
          f"{sample_bytes / 1e6:.3f} MB per sample uncompressed; {platform.machine()}, {cores} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    print()
    print(f"| reader | random samples/s | ms per sample | shuffled batches of {args.batch_size}/s | samples/s in batches |")
    print("|---|---|---|---|---|")
    for name, (one, many) in rows.items():
        print(f"| {name} | {one:.0f} | {1000 / one:.3f} | {many:.1f} | {many * args.batch_size:.0f} |")
    for workers, rate_ in dl.items():
        how = f"{workers} workers" if workers else "0 workers (prefetch thread)"
        print(f"| DataLoader, StoreIterableDataset, {how} | | | "
              f"{rate_ / args.batch_size:.1f} | {rate_:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"store": store.location, "samples": n, "features": features,
                       "sample_bytes": sample_bytes, "rows": rows,
                       "dataloader_samples_per_s": {str(k): v for k, v in dl.items()}}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
