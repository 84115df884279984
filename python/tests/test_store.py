"""tensorbake.open / Store: spec, index, samples, batches, dtypes, null embeddings, order."""

from __future__ import annotations

import json
import os
import pickle
import threading

import ml_dtypes
import numpy as np
import pytest

import tensorbake
from conftest import require
from tensorbake._testing import EVERY_DTYPE, write_synthetic_store

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Every dtype, three parts (one empty), small shards, one part left uncommitted."""
    loc = tmp_path_factory.mktemp("synthetic") / "s.zarr"
    write_synthetic_store(
        loc, EVERY_DTYPE, {"c": 14, "a": 11, "b": 0},
        uncommitted={"aa": 5}, null_arrays=["emb_bf16", "ids_u16", "len_u32"],
        seed=3, shard_bytes=1024,
    )
    return loc


def test_open_reports_spec_parts_and_arrays(demo_store):
    s = tensorbake.open(demo_store)
    root = json.loads((demo_store / "zarr.json").read_text())["attributes"]["tensorbake"]
    assert s.spec["features"] == root["features"]
    assert set(s.features) >= {"sd_vae_mean", "sd_vae_std", "siglip_hidden", "clip_image_embeds",
                               "t5_hidden", "t5_len"}
    assert s.resolution == 64
    assert s.models["t5_hidden"] == root["features"]["t5_hidden"]["model"]
    assert s.weights_sha256["siglip_hidden"] == root["features"]["siglip_hidden"]["weights_sha256"]
    assert len(s.weights_sha256["siglip_hidden"]) == 64
    assert s.preprocessing["siglip_hidden"] == root["features"]["siglip_hidden"]["preprocess"]
    assert len(s) == 18
    assert [p.samples for p in s.parts] == [6, 6, 6]
    assert [p.start for p in s.parts] == [0, 6, 12]
    assert all(p.source.endswith(".tar") for p in s.parts)
    assert s.uncommitted_parts == []
    assert s.arrays["siglip_hidden"].dtype == BF16
    assert s.arrays["sd_vae_mean"].dtype == np.float32
    assert s.arrays["t5_len"].shape == ()
    assert s.arrays["key"].is_string
    assert "Store(" in repr(s)


def test_sample_types_and_shapes(demo_store):
    s = tensorbake.open(demo_store)
    x = s[7]
    assert set(x) == set(s.arrays)
    assert isinstance(x["key"], str) and isinstance(x["caption"], str)
    for name, info in s.arrays.items():
        if info.is_string:
            continue
        assert x[name].dtype == info.dtype, name
        assert x[name].shape == info.shape, name
    assert x["siglip_hidden"].dtype == BF16
    assert x["orig_size"].dtype == np.uint32 and x["orig_size"].shape == (2,)
    assert 0 < int(x["t5_len"]) <= s.arrays["t5_hidden"].shape[0]
    # the same sample every time, negative indices from the end
    y = s[7 - 18]
    assert y["key"] == x["key"]
    np.testing.assert_array_equal(y["siglip_hidden"].view(np.uint16), x["siglip_hidden"].view(np.uint16))
    part, row = s.locate(7)
    assert (part.name, row) == (s.parts[1].name, 1)
    keys = {s[i]["key"] for i in range(len(s))}
    assert len(keys) == 18


def test_get_batch_equals_samples_in_order(demo_store):
    s = tensorbake.open(demo_store)
    idx = [17, 0, 5, 6, 5]
    b = s.get_batch(idx, features=["siglip_hidden", "t5_hidden", "t5_len", "caption"])
    assert set(b) == {"key", "siglip_hidden", "t5_hidden", "t5_len", "caption"}
    assert b["siglip_hidden"].shape == (5, *s.arrays["siglip_hidden"].shape)
    assert b["t5_len"].shape == (5,)
    for j, i in enumerate(idx):
        x = s.sample(i)
        assert b["key"][j] == x["key"] and b["caption"][j] == x["caption"]
        for name in ["siglip_hidden", "t5_hidden", "t5_len"]:
            assert b[name][j].tobytes() == x[name].tobytes(), (name, i)
    # threads do not change the bytes
    one = s.get_batch(range(18), ["sd_vae_mean", "siglip_hidden"], threads=1)
    four = s.get_batch(np.arange(18), ["sd_vae_mean", "siglip_hidden"], threads=4)
    for name in ["sd_vae_mean", "siglip_hidden"]:
        assert one[name].tobytes() == four[name].tobytes()
    assert one["key"] == four["key"] == [s[i]["key"] for i in range(18)]
    assert s[2:5]["key"] == [s[i]["key"] for i in (2, 3, 4)]
    empty = s.get_batch([], ["t5_hidden"])
    assert empty["t5_hidden"].shape == (0, *s.arrays["t5_hidden"].shape) and empty["key"] == []


def test_every_dtype_round_trips_with_its_numpy_dtype(synthetic, zarr_python):
    s = tensorbake.open(synthetic)
    assert len(s) == 25 and [p.name for p in s.parts] == ["a", "b", "c"]
    assert s.uncommitted_parts == ["aa"]
    want = {"emb_bf16": BF16, "lat_f16": np.float16, "lat_f32": np.float32,
            "ids_u16": np.uint16, "len_u32": np.uint32}
    b = s.get_batch(range(25))
    root = zarr_python.open_group(str(synthetic), mode="r")
    for name, dt in want.items():
        assert b[name].dtype == dt, name
        z = np.concatenate([root["parts"]["a"][name][...], root["parts"]["c"][name][...]])
        assert z.dtype == b[name].dtype
        assert z.tobytes() == b[name].tobytes(), name
    assert b["key"][:2] == ["a_00000", "a_00001"] and b["key"][11] == "c_00000"
    assert b["caption"][1] == "ein Fahrrad, grün — 自転車 1 🚲"
    assert b["caption"][0] == ""  # an empty caption is the fill value, read back as ""
    nulls = s.null_embeddings()
    assert sorted(nulls) == ["emb_bf16", "ids_u16", "len_u32"]
    for name, a in nulls.items():
        z = zarr_python.open_array(str(synthetic), path=f"null/{name}", mode="r")[0]
        assert a.dtype == z.dtype and a.shape == z.shape and a.tobytes() == z.tobytes(), name
    assert s.null_embedding("lat_f16") is None
    with pytest.raises(tensorbake.StoreError, match="lat_nope"):
        s.null_embedding("lat_nope")


def test_single_sample_arrays_are_the_decoded_buffer_and_torch_is_zero_copy(demo_store):
    s = tensorbake.open(demo_store)
    x = s.sample(3, ["siglip_hidden"])
    a = x["siglip_hidden"]
    assert a.flags.writeable and a.flags.c_contiguous
    assert a.base is not None  # a view of the buffer Rust decoded into, not a copy
    torch = require("torch")
    t = tensorbake.to_torch(a)
    assert t.dtype == torch.bfloat16 and t.data_ptr() == a.ctypes.data
    b = s.get_batch([1, 2], ["sd_vae_mean", "t5_len"], as_torch=True)
    assert b["sd_vae_mean"].dtype == torch.float32 and b["t5_len"].dtype == torch.int64
    assert torch.equal(b["sd_vae_mean"][1], torch.from_numpy(s[2]["sd_vae_mean"]))


def test_null_embeddings_equal_zarr_pythons_null_group(demo_store, zarr_python):
    s = tensorbake.open(demo_store)
    nulls = s.null_embeddings()
    assert "t5_hidden" in nulls
    assert set(nulls) == set(s.null_names)
    for name, a in nulls.items():
        assert a.shape == s.arrays[name].shape and a.dtype == s.arrays[name].dtype
        z = zarr_python.open_array(str(demo_store), path=f"null/{name}", mode="r")[0]
        assert a.tobytes() == z.tobytes(), name


def test_epoch_order_is_the_rust_loaders(demo_store):
    # pinned in store/src/loader.rs
    assert tensorbake.epoch_order(8, 42, 3).tolist() == [6, 1, 4, 5, 3, 7, 0, 2]
    s = tensorbake.open(demo_store)
    order = s.epoch_order(seed=7, epoch=2)
    assert order.dtype == np.uint64 and sorted(order.tolist()) == list(range(18))
    batches = s._reader.loader_indices(7, 2, 4)
    assert [i for b in batches for i in b] == order.tolist()
    assert s.epoch_order(7, 3).tolist() != order.tolist()


def test_store_pickles_and_survives_fork(demo_store):
    s = tensorbake.open(demo_store)
    want = s.get_batch(range(18), ["siglip_hidden"])  # the parent has read (and has threads)
    t = pickle.loads(pickle.dumps(s))
    assert t.location == s.location and len(t) == 18
    assert t[4]["key"] == s[4]["key"]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: read with the store object inherited from the parent
        try:
            got = s.get_batch(range(18), ["siglip_hidden"])
            ok = got["siglip_hidden"].tobytes() == want["siglip_hidden"].tobytes()
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"


def test_reads_from_several_python_threads(demo_store):
    s = tensorbake.open(demo_store)
    want = s.get_batch(range(18), ["siglip_hidden", "t5_hidden"])
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(s.get_batch(range(18), ["siglip_hidden", "t5_hidden"]))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(results) == 20
    for r in results:
        assert r["t5_hidden"].tobytes() == want["t5_hidden"].tobytes()


def test_get_batch_decodes_into_given_buffers(demo_store):
    s = tensorbake.open(demo_store)
    want = s.get_batch([4, 2, 9], ["siglip_hidden", "sd_vae_mean", "t5_len"])
    sig = np.empty((3, *s.arrays["siglip_hidden"].shape), dtype=BF16)
    raw = np.empty(3 * s.arrays["sd_vae_mean"].sample_bytes, dtype=np.uint8)
    got = s.get_batch([4, 2, 9], ["siglip_hidden", "sd_vae_mean", "t5_len"],
                      out={"siglip_hidden": sig, "sd_vae_mean": raw})
    assert got["siglip_hidden"] is sig and got["sd_vae_mean"] is raw
    assert sig.tobytes() == want["siglip_hidden"].tobytes()
    assert raw.tobytes() == want["sd_vae_mean"].tobytes()
    assert got["t5_len"].tolist() == want["t5_len"].tolist() and got["key"] == want["key"]
    with pytest.raises(ValueError, match="siglip_hidden"):
        s.get_batch([4, 2], ["siglip_hidden"], out={"siglip_hidden": sig})  # 3 samples' bytes for 2
    with pytest.raises(ValueError, match="not read"):
        s.get_batch([4], ["t5_len"], out={"siglip_hidden": sig})
    torch = require("torch")
    t = torch.empty((3, *s.arrays["siglip_hidden"].shape), dtype=torch.bfloat16)
    got = s.get_batch([4, 2, 9], ["siglip_hidden"], out={"siglip_hidden": t}, as_torch=True)
    assert got["siglip_hidden"] is t
    assert t.view(torch.uint16).numpy().tobytes() == want["siglip_hidden"].tobytes()
