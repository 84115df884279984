"""Random single-sample reads of a tensorbake store with zarr-python and tensorstore.

Run by the store benchmark (`cargo bench -p tensorbake-store --bench store`) on the
store it has just written, so the three readers are measured in the same run on the
same bytes:

    python store_bench.py STORE REQUEST.json

REQUEST.json: {"arrays": [names], "reads": [[part, row], ...]}. Every reader opens the
arrays of every part first (not timed), reads reads[0] once to warm up, then reads all
`reads` one sample at a time (every array in `arrays`), and reports reads per second.
Prints {"zarr_python": reads_per_s, "tensorstore": reads_per_s}.
Needs zarr 3.1, tensorstore, numpy, ml_dtypes, google-crc32c.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tensorbake_zarr  # noqa: E402,F401
import tensorstore as ts  # noqa: E402
import zarr  # noqa: E402


def bench(open_fn, read_fn, arrays, reads):
    parts = sorted({p for p, _ in reads})
    opened = {(p, a): open_fn(p, a) for p in parts for a in arrays}
    for a in arrays:
        read_fn(opened[(reads[0][0], a)], reads[0][1])
    start = time.perf_counter()
    for p, row in reads:
        for a in arrays:
            read_fn(opened[(p, a)], row)
    return len(reads) / (time.perf_counter() - start)


def main():
    store, request = sys.argv[1], sys.argv[2]
    with open(request) as f:
        req = json.load(f)
    arrays, reads = req["arrays"], [tuple(r) for r in req["reads"]]
    out = {}
    out["zarr_python"] = bench(
        lambda p, a: zarr.open_array(os.path.join(store, "parts", p, a), mode="r"),
        lambda arr, row: arr[row],
        arrays,
        reads,
    )
    ctx = ts.Context()
    out["tensorstore"] = bench(
        lambda p, a: ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(store, "parts", p, a)}},
            context=ctx,
        ).result(),
        lambda t, row: t[row].read().result(),
        arrays,
        reads,
    )
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
