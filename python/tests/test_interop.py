"""tensorbake's values equal zarr-python's and tensorstore's, on the same store."""

from __future__ import annotations

import numpy as np

import tensorbake
from conftest import require


def test_every_value_equals_zarr_python_and_tensorstore(demo_store, zarr_python):
    ts = require("tensorstore")
    s = tensorbake.open(demo_store)
    root = zarr_python.open_group(str(demo_store), mode="r")
    everything = s.get_batch(range(len(s)))
    checked = 0
    for part in s.parts:
        group = root["parts"][part.name]
        rows = slice(part.start, part.stop)
        for name, info in s.arrays.items():
            ours = everything[name][rows]
            z = group[name][...]
            if info.is_string:
                assert [str(v) for v in z] == ours, (part.name, name)
                continue
            assert z.dtype == ours.dtype and z.shape == ours.shape, (part.name, name)
            assert z.tobytes() == np.ascontiguousarray(ours).tobytes(), (part.name, name)
            t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                         "path": str(demo_store / "parts" / part.name / name)}}).result()
            tv = t.read().result()
            assert tv.dtype == ours.dtype, (part.name, name, tv.dtype)
            assert tv.tobytes() == np.ascontiguousarray(ours).tobytes(), (part.name, name)
            # and one random sample on its own (the single-sample path)
            one = s.sample(part.start + 3, [name])[name]
            assert one.tobytes() == tv[3].tobytes(), (part.name, name)
            checked += 1
    assert checked == 3 * sum(1 for a in s.arrays.values() if not a.is_string)
