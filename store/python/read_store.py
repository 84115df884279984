"""Read a tensorbake store with zarr-python and tensorstore and print what they see.

Used by the interop test (tests/store.rs): the test writes a store with tensorbake,
runs this script, and compares every value with what it wrote.

    python read_store.py STORE

Prints one JSON object: {"zarr_python": {...}, "tensorstore": {...}} where each reader
maps part -> array -> {"dtype", "shape", "sha256" (of the C-order little-endian bytes)}
for numeric arrays and part -> array -> [strings] for string arrays (zarr-python only:
tensorstore has no variable-length string data type). Needs zarr 3.1, tensorstore,
numpy, ml_dtypes, google-crc32c (scripts/requirements-test.txt).
"""
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tensorbake_zarr  # noqa: E402,F401  (registers bfloat16)
import numpy as np  # noqa: E402
import tensorstore as ts  # noqa: E402
import zarr  # noqa: E402


def digest(a):
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.byteswap().view(a.dtype.newbyteorder("<"))
    return {"dtype": str(a.dtype), "shape": list(a.shape), "sha256": hashlib.sha256(a.tobytes()).hexdigest()}


def committed_parts(store):
    parts = []
    root = os.path.join(store, "parts")
    for name in sorted(os.listdir(root)):
        meta = os.path.join(root, name, "zarr.json")
        if not os.path.exists(meta):
            continue
        with open(meta) as f:
            attrs = json.load(f).get("attributes", {}).get("tensorbake_part", {})
        if attrs.get("committed") is True:
            parts.append(name)
    return parts


def main():
    store = sys.argv[1]
    root = zarr.open_group(store, mode="r")
    spec = root.attrs["tensorbake"]
    out = {"zarr_python": {}, "tensorstore": {}, "features": sorted(spec["features"])}
    for part in committed_parts(store):
        group = root["parts"][part]
        zp = out["zarr_python"][part] = {}
        tsp = out["tensorstore"][part] = {}
        for name, arr in group.arrays():
            values = arr[...]
            if arr.metadata.data_type.to_json(zarr_format=3) == "string":
                zp[name] = [str(v) for v in values]
                continue
            zp[name] = digest(values)
            t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(store, "parts", part, name)}}).result()
            tsp[name] = digest(t.read().result())
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
