"""The peer of `tensorbake bench write`: tensorstore writes the same feature bytes into
the same Zarr v3 layout, in the same run, on the same disk.

    python store_write.py REQUEST.json

REQUEST.json (written by the Rust bench):
    {"dir": where to write, "parts": P, "samples": K per part, "batch": B,
     "pool": batches in the pool, "zstd_level": 3,
     "arrays": [{"name", "dtype" (zarr data_type), "shape" (per sample),
                 "shard_samples", "file" (pool bytes, batch-major)}]}

Each part is K samples; sample i of a part is row i % B of pool batch (i // B) % pool,
exactly as the Rust bench sends them to its writers. The layout is tensorbake's
(docs/store.md): shards of `shard_samples` samples, one inner chunk per sample,
bytes -> zstd(level) -> crc32c inside, the shard index bytes -> crc32c. tensorstore
fsyncs each file it writes (`file_io_sync`, on by default), as tensorbake does.

Every write of every part is issued at once and awaited together: tensorstore
spreads the encoding over its own thread pools (all cores). The untimed set-up builds
each part's array in memory; the timed part is create + write + flush.
Prints {"seconds", "cpu_seconds", "bytes"} as JSON (CPU time: this process, all
threads, from resource.getrusage).
"""
import json
import os
import resource
import sys
import time

import ml_dtypes  # noqa: F401  (numpy bfloat16)
import numpy as np
import tensorstore as ts

NUMPY = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32,
         "uint16": np.uint16, "uint32": np.uint32}


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def spec(path, a, samples, level):
    shape = [samples] + a["shape"]
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": path},
        "metadata": {
            "shape": shape,
            "data_type": a["dtype"],
            "chunk_grid": {"name": "regular",
                           "configuration": {"chunk_shape": [a["shard_samples"]] + a["shape"]}},
            "codecs": [{
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [1] + a["shape"],
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                               {"name": "zstd", "configuration": {"level": level, "checksum": False}},
                               {"name": "crc32c"}],
                    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                     {"name": "crc32c"}],
                    "index_location": "end",
                },
            }],
        },
        "create": True,
        "delete_existing": True,
    }


def part_data(a, samples, batch, pool):
    dtype = NUMPY[a["dtype"]]
    per = int(np.prod(a["shape"], dtype=np.int64)) if a["shape"] else 1
    raw = np.fromfile(a["file"], dtype=dtype).reshape([pool * batch] + a["shape"])
    rows = [(i // batch) % pool * batch + i % batch for i in range(samples)]
    out = raw[rows]
    assert out.size == samples * per
    return out


def main():
    with open(sys.argv[1]) as f:
        req = json.load(f)
    k, b, pool, level = req["samples"], req["batch"], req["pool"], req["zstd_level"]
    data = {a["name"]: part_data(a, k, b, pool) for a in req["arrays"]}
    ctx = ts.Context()
    # warm-up (not timed): one small array through the same codecs, so that the
    # thread pools and codec tables exist before the clock starts
    warm = dict(req["arrays"][0], shard_samples=1)
    t = ts.open(spec(os.path.join(req["dir"], "warmup"), warm, 1, level), context=ctx).result()
    t[0:1] = data[warm["name"]][0:1]
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    stores = []
    for p in range(req["parts"]):
        for a in req["arrays"]:
            path = os.path.join(req["dir"], f"part-{p:04}", a["name"])
            stores.append((ts.open(spec(path, a, k, level), context=ctx), a["name"]))
    writes = [s.result().write(data[name]) for s, name in stores]
    for w in writes:
        w.commit.result()
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    total = sum(d.nbytes for d in data.values()) * req["parts"]
    json.dump({"seconds": seconds, "cpu_seconds": cpu, "bytes": total}, sys.stdout)


if __name__ == "__main__":
    main()
