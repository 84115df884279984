"""tensorbake.torch datasets with torch's DataLoader: every sample once per epoch across
ranks x workers, the Rust loader's order, values equal to the store's."""

from __future__ import annotations

import collections

import numpy as np
import pytest

import tensorbake
from conftest import require

torch = require("torch")
from torch.utils.data import DataLoader  # noqa: E402

from tensorbake.torch import StoreDataset, StoreIterableDataset, resolve_rank  # noqa: E402

FEATURES = ["siglip_hidden", "t5_hidden", "t5_len", "sd_vae_mean"]


def _indices(batches):
    return [int(i) for b in batches for i in b["index"]]


def test_map_style_dataset_with_workers_returns_the_stores_values(demo_store):
    store = tensorbake.open(demo_store)
    ds = StoreDataset(demo_store, FEATURES)
    assert len(ds) == 18
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    assert _indices(batches) == list(range(18))
    want = store.get_batch(range(18), FEATURES, as_torch=True)
    got = {name: torch.cat([b[name] for b in batches]) for name in FEATURES}
    for name in FEATURES:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name
    assert got["siglip_hidden"].dtype == torch.bfloat16
    assert [k for b in batches for k in b["key"]] == want["key"]
    one = ds[5]
    assert one["index"] == 5 and one["key"] == want["key"][5]


@pytest.mark.parametrize("batch_size", [4, None])
def test_two_workers_times_two_ranks_read_every_sample_once_per_epoch(demo_store, batch_size):
    store = tensorbake.open(demo_store)
    keys = store.get_batch(range(18), ["key"])["key"]
    orders = []
    for epoch in (0, 1):
        seen = collections.Counter()
        order = []
        for rank in (0, 1):
            ds = StoreIterableDataset(store, FEATURES, batch_size=batch_size, seed=11,
                                      rank=rank, world_size=2)
            ds.set_epoch(epoch)
            if batch_size:
                loader = DataLoader(ds, batch_size=None, num_workers=2)
            else:
                loader = DataLoader(ds, batch_size=3, num_workers=2)
            batches = list(loader)
            yielded = len(batches) if batch_size else sum(len(b["index"]) for b in batches)
            assert yielded == len(ds)
            for b in batches:
                for j, i in enumerate(b["index"]):
                    assert b["key"][j] == keys[int(i)]  # the sample is the one it says it is
                    seen[int(i)] += 1
                    order.append(int(i))
                assert b["siglip_hidden"].shape[0] == len(b["index"])
                if batch_size:  # decoded in the worker (into shared memory), equal to a read here
                    want = store.get_batch(b["index"].numpy(), FEATURES, as_torch=True)
                    for name in FEATURES:
                        assert b[name].dtype == want[name].dtype and torch.equal(b[name], want[name]), name
        assert sorted(seen) == list(range(18)) and set(seen.values()) == {1}, seen
        orders.append(order)
    assert orders[0] != orders[1]  # each epoch has its own order


def test_one_rank_yields_the_rust_loaders_batches_in_order(demo_store):
    store = tensorbake.open(demo_store)
    for workers in (0, 2):
        ds = StoreIterableDataset(store, ["t5_len"], batch_size=4, seed=5, epoch=3)
        got = [b["index"].tolist() for b in DataLoader(ds, batch_size=None, num_workers=workers)]
        assert got == store._reader.loader_indices(5, 3, 4), workers
    ds = StoreIterableDataset(store, ["t5_len"], batch_size=4, seed=5, epoch=3, drop_last=True)
    got = [b["index"].tolist() for b in DataLoader(ds, batch_size=None, num_workers=2)]
    assert got == store._reader.loader_indices(5, 3, 4, drop_last=True)
    ds = StoreIterableDataset(store, ["t5_len"], seed=5, epoch=3)
    assert [int(s["index"]) for s in ds] == store.epoch_order(5, 3).tolist()
    ds = StoreIterableDataset(store, ["t5_len"], batch_size=5, shuffle=False)
    assert [b["index"].tolist() for b in ds] == [list(range(i, min(i + 5, 18))) for i in range(0, 18, 5)]


def test_len_counts_what_iteration_yields(demo_store):
    for world in (1, 2, 4, 5):
        for batch_size in (None, 1, 4, 7):
            for drop_last in (False, True):
                for rank in range(world):
                    ds = StoreIterableDataset(demo_store, ["t5_len"], batch_size=batch_size, rank=rank,
                                              world_size=world, drop_last=drop_last, prefetch=0)
                    items = ds.rank_batches() if batch_size else ds.rank_order()
                    assert len(ds) == len(items), (world, batch_size, drop_last, rank)


def test_drop_last_gives_every_rank_the_same_steps(demo_store):
    lens = []
    for rank in range(4):
        ds = StoreIterableDataset(demo_store, ["t5_len"], batch_size=2, rank=rank, world_size=4, drop_last=True)
        batches = list(DataLoader(ds, batch_size=None, num_workers=2))
        assert len(batches) == len(ds)
        assert all(len(b["index"]) == 2 for b in batches)
        lens.append(len(batches))
    assert lens == [2, 2, 2, 2]  # 18 -> 16 samples, 4 per rank, 2 batches of 2


def test_rank_and_world_from_arguments_env_and_errors(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_rank() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_rank() == (2, 3)
    assert resolve_rank(0, None) == (0, 3)
    assert resolve_rank(1, 2) == (1, 2)
    with pytest.raises(ValueError, match="rank 3"):
        resolve_rank(3, 2)


def test_unknown_features_fail_at_construction_and_worker_errors_keep_their_class(demo_store, store_copy):
    with pytest.raises(tensorbake.UnknownArrayError, match="flux_vae_mean"):
        StoreIterableDataset(demo_store, ["flux_vae_mean"], batch_size=2)
    with pytest.raises(tensorbake.UnknownArrayError, match="flux_vae_mean"):
        StoreDataset(demo_store, ["flux_vae_mean"])
    s = tensorbake.open(store_copy)
    part = s.parts[0].name
    shard_dir = store_copy / "parts" / part / "t5_hidden" / "c"
    shard = sorted(p for p in shard_dir.rglob("*") if p.is_file())[0]
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = StoreIterableDataset(store_copy, ["t5_hidden"], batch_size=18, shuffle=False)
    for workers in (1, 0):  # from a worker process; from the prefetch thread
        with pytest.raises(tensorbake.CorruptDataError) as e:
            list(DataLoader(ds, batch_size=None, num_workers=workers))
        assert part in str(e.value) and "t5_hidden" in str(e.value) and str(store_copy) in str(e.value)


def test_the_prefetch_thread_keeps_the_order_and_stops_when_abandoned(demo_store):
    store = tensorbake.open(demo_store)
    plain = StoreIterableDataset(store, ["t5_len"], batch_size=2, seed=4, prefetch=0)
    ahead = StoreIterableDataset(store, ["t5_len"], batch_size=2, seed=4, prefetch=3)
    assert [b["index"].tolist() for b in ahead] == [b["index"].tolist() for b in plain]
    it = iter(ahead)
    next(it)
    it.close()  # the producer sees the stop flag and ends


def test_numpy_mode(demo_store):
    ds = StoreIterableDataset(demo_store, ["siglip_hidden", "t5_len"], batch_size=6, as_torch=False)
    b = next(iter(ds))
    assert isinstance(b["siglip_hidden"], np.ndarray) and b["t5_len"].dtype == np.uint32
