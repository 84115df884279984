"""PyTorch datasets over a tensorbake store.

``StoreDataset`` is map-style (any sampler; ``DataLoader`` fetches a whole batch with one
parallel native read through ``__getitems__``). ``StoreIterableDataset`` shuffles by
``(seed, epoch)`` exactly like tensorbake's Rust loader and splits the epoch between
ranks (``torch.distributed``, ``RANK``/``WORLD_SIZE`` or arguments) and DataLoader
workers, so that every sample is read once per epoch across all of them::

    from torch.utils.data import DataLoader
    from tensorbake.torch import StoreIterableDataset

    ds = StoreIterableDataset("pd12m-512.zarr", ["sd_vae_mean", "sd_vae_std", "t5_hidden", "t5_len"],
                              batch_size=32, seed=0)
    loader = DataLoader(ds, batch_size=None, num_workers=4, pin_memory=True)
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for batch in loader:          # {"t5_hidden": bf16 tensor [32, 120, 4096], ..., "key": [str]}
            ...

Samples are dicts: tensors for numeric arrays (bfloat16 stays bfloat16, unsigned
integers become int64), lists of str (batches) or str (samples) for ``key`` /
``caption`` / ``caption_raw``, and ``index``: the global sample index.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ._store import Store
from ._store import open as _open

__all__ = ["StoreDataset", "StoreIterableDataset", "resolve_rank"]


def _as_store(store) -> Store:
    return store if isinstance(store, Store) else _open(store)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the arguments where given; else ``torch.distributed``
    when its process group is initialised; else the ``RANK`` / ``WORLD_SIZE``
    environment variables (torchrun sets them); else ``(0, 1)``."""
    if rank is None or world_size is None:
        r, w = 0, 1
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            r, w = dist.get_rank(), dist.get_world_size()
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            r, w = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    rank, world_size = int(rank), int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size} (world size {world_size})")
    return rank, world_size


_TORCH = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def _shared_out(store: Store, names: Sequence[str] | None, n: int) -> dict:
    """Tensors in shared memory for a batch of ``n`` samples' float arrays, all views of
    one shared storage: a DataLoader worker decodes straight into them, and the batch
    reaches the main process as one shared-memory segment, without the copy into
    shared memory torch would otherwise make. Integer arrays (converted to int64,
    small) take the normal path."""
    layout, total = [], 0
    for name in names if names is not None else list(store.arrays):
        info = store.arrays[name]
        if info.is_string or info.dtype.name not in _TORCH:
            continue
        layout.append((name, info, total))
        total += -(-n * info.sample_bytes // 64) * 64  # 64-byte aligned views
    if not layout:
        return {}
    try:
        flat = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
    except (AttributeError, RuntimeError, TypeError):  # private API moved: torch copies instead
        return {}
    return {
        name: flat[off : off + n * info.sample_bytes].view(_TORCH[info.dtype.name]).view(n, *info.shape)
        for name, info, off in layout
    }


def _split(batch: dict, n: int, indices) -> list[dict]:
    """One batch dict -> ``n`` sample dicts (views of the batch tensors)."""
    samples = []
    for j in range(n):
        s = {name: value[j] for name, value in batch.items()}
        s["index"] = int(indices[j])
        samples.append(s)
    return samples


class StoreDataset(Dataset):
    """Map-style dataset: item ``i`` is sample ``i`` of the store.

    ``features``: the arrays to read (``key`` always; ``None``: every array).
    ``as_torch``: tensors (default) or NumPy arrays. ``transform``: applied to each
    sample dict. With a DataLoader, a batch of indices is read in one parallel native
    call (``__getitems__``) and collated as usual.
    """

    def __init__(
        self,
        store: Store | str | os.PathLike,
        features: Sequence[str] | None = None,
        *,
        as_torch: bool = True,
        transform: Callable[[dict], dict] | None = None,
        threads: int | None = None,
    ):
        self.store = _as_store(store)
        self.features = None if features is None else list(features)
        self.as_torch = as_torch
        self.transform = transform
        self.threads = threads
        self._check()

    def _check(self):
        if self.features is not None:
            self.store.get_batch([], self.features)  # unknown arrays fail here, naming the store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict:
        i = self.store._index(index)
        s = self.store.sample(i, self.features, as_torch=self.as_torch)
        s["index"] = i
        return self.transform(s) if self.transform else s

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        batch = self.store.get_batch(indices, self.features, as_torch=self.as_torch, threads=self.threads)
        idx = self.store._indices(indices)
        samples = _split(batch, len(idx), idx)
        return [self.transform(s) for s in samples] if self.transform else samples


class StoreIterableDataset(IterableDataset):
    """Shuffled epochs of a store, split by rank and by DataLoader worker.

    The epoch's order is ``tensorbake.epoch_order(len(store), seed, epoch)``: the Rust
    loader's. Rank ``r`` of ``world_size`` takes positions ``r, r + world_size, ...``
    of it (so the samples of global step ``s`` are a contiguous stretch of the order,
    whatever the world size); with ``batch_size`` those are cut into batches and
    DataLoader worker ``w`` of ``W`` reads batches ``w, w + W, ...``; the DataLoader
    hands them out in that same round-robin order, so with ``world_size = 1`` the
    batches are exactly the Rust loader's, in its order. Without ``batch_size`` the
    dataset yields single samples (worker ``w`` takes every ``W``-th) for a DataLoader
    that batches and collates them.

    Every sample is yielded once per epoch across all ranks and workers. Ranks differ
    by at most one sample; ``drop_last=True`` drops the epoch's last ``len % world_size``
    samples and a last incomplete batch, so every rank takes the same number of steps
    (what DDP needs). Call :meth:`set_epoch` before each epoch (with
    ``persistent_workers=True`` the workers keep the epoch they started with).

    ``rank`` / ``world_size``: see :func:`resolve_rank` (resolved when the dataset is
    made, in the main process). ``threads``: native read threads per batch (default:
    the cores divided among the DataLoader workers). ``prefetch``: with
    ``num_workers=0`` (or no DataLoader), items read ahead on a background thread; the
    native reads release the GIL, so they overlap the training step without worker
    processes (often the fastest on few cores: no shared-memory hand-over).
    """

    def __init__(
        self,
        store: Store | str | os.PathLike,
        features: Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        as_torch: bool = True,
        transform: Callable[[dict], dict] | None = None,
        threads: int | None = None,
        read_ahead: int = 32,
        prefetch: int = 2,
    ):
        self.store = _as_store(store)
        self.features = None if features is None else list(features)
        self.prefetch = max(0, int(prefetch))
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.batch_size = None if batch_size is None else int(batch_size)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.as_torch = as_torch
        self.transform = transform
        self.threads = threads
        self.read_ahead = max(1, int(read_ahead))
        if self.features is not None:
            self.store.get_batch([], self.features)  # unknown arrays fail here

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads (its own shuffled order)."""
        self.epoch = int(epoch)

    def rank_order(self) -> np.ndarray:
        """This rank's global sample indices for the current epoch, in order (int64)."""
        n = len(self.store)
        if self.shuffle:
            order = self.store.epoch_order(self.seed, self.epoch).astype(np.int64)
        else:
            order = np.arange(n, dtype=np.int64)
        if self.drop_last:
            order = order[: n - n % self.world_size]
        return order[self.rank :: self.world_size]

    def rank_batches(self) -> list[np.ndarray]:
        """This rank's batches for the current epoch (``batch_size`` must be set)."""
        if self.batch_size is None:
            raise ValueError("rank_batches needs batch_size")
        mine = self.rank_order()
        b = self.batch_size
        batches = [mine[i : i + b] for i in range(0, len(mine), b)]
        if self.drop_last and batches and len(batches[-1]) < b:
            batches.pop()
        return batches

    def __len__(self) -> int:
        """Items this rank yields per epoch (batches with ``batch_size``, else samples),
        counted without computing the epoch's order."""
        n = len(self.store)
        if self.drop_last:
            n -= n % self.world_size
        mine = len(range(self.rank, n, self.world_size))
        if self.batch_size is None:
            return mine
        if self.drop_last:
            return mine // self.batch_size
        return -(-mine // self.batch_size)

    def _threads(self, workers: int) -> int:
        if self.threads is not None:
            return int(self.threads)
        return max(1, _cores() // max(1, workers))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is None and self.prefetch > 0:
            # In the main process (num_workers=0): read ahead on a thread. The reads
            # release the GIL, so they overlap the training step, with no worker
            # processes and no shared-memory hand-over.
            return _prefetched(self._items(None), self.prefetch)
        return self._items(info)

    def _items(self, info) -> Iterator[dict]:
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        threads = self._threads(workers)
        if self.batch_size is not None:
            for idx in self.rank_batches()[wid::workers]:
                out = _shared_out(self.store, self.features, len(idx)) if info and self.as_torch else None
                batch = self.store.get_batch(idx, self.features, as_torch=self.as_torch, threads=threads, out=out)
                batch["index"] = torch.from_numpy(idx.copy()) if self.as_torch else idx
                yield self.transform(batch) if self.transform else batch
            return
        mine = self.rank_order()[wid::workers]
        for start in range(0, len(mine), self.read_ahead):
            idx = mine[start : start + self.read_ahead]
            batch = self.store.get_batch(idx, self.features, as_torch=self.as_torch, threads=threads)
            for s in _split(batch, len(idx), idx):
                yield self.transform(s) if self.transform else s


_DONE = object()


def _prefetched(items: Iterator[dict], depth: int) -> Iterator[dict]:
    """``items`` produced on a daemon thread, up to ``depth`` ahead; errors are raised
    here, in order; abandoning the iterator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((_DONE, None))
        except BaseException as e:  # noqa: BLE001  (re-raised in the consumer)
            q.put((_DONE, e))

    thread = threading.Thread(target=produce, name="tensorbake-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, err = q.get()
            if item is _DONE:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
