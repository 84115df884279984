"""The Store: a tensorbake store opened for reading (see ``docs/python.md``)."""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from . import _native
from .errors import SampleIndexError, UncommittedPartError, UnknownPartError

#: NumPy dtype of each Zarr data type tensorbake writes (all little-endian).
DTYPES: Mapping[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
}

# Readers opened in a parent process and left behind in a forked child: never used
# or dropped there (their threads and file handles belong to the parent).
_ORPHANS: list = []


@dataclass(frozen=True)
class ArrayInfo:
    """One array of every part: ``dtype`` is a NumPy dtype, or ``"string"`` for
    ``key`` / ``caption`` / ``caption_raw``; ``shape`` is per sample."""

    name: str
    dtype: Any
    shape: tuple[int, ...]

    @property
    def is_string(self) -> bool:
        return isinstance(self.dtype, str)

    @property
    def sample_bytes(self) -> int:
        """Uncompressed bytes per sample (0 for strings)."""
        if self.is_string:
            return 0
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class Part:
    """A committed part: ``samples`` rows at global indices ``start .. start+samples``,
    made from input shard ``source``."""

    name: str
    samples: int
    source: str
    start: int

    @property
    def stop(self) -> int:
        return self.start + self.samples

    def __len__(self) -> int:
        return self.samples


def to_torch(a: np.ndarray):
    """A NumPy array from the store as a torch tensor: floats without a copy (bfloat16
    as ``torch.bfloat16``), unsigned integers as ``int64`` (torch has few kernels for
    ``uint16``/``uint32``; one small copy)."""
    import torch

    if a.dtype == DTYPES["bfloat16"]:
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    if a.dtype.kind == "u":
        return torch.from_numpy(a.astype(np.int64))
    return torch.from_numpy(a)


class Store:
    """A tensorbake store opened for reading: the committed parts as one index.

    ``Store(location)`` is :func:`tensorbake.open`. Sample ``i`` is the same sample on
    every read of the same set of committed parts (taken when the store is opened).
    A Store can be shared between threads, pickled (it reopens by location) and used
    after ``fork`` (each process opens its own native reader), so it can be handed to
    DataLoader workers as it is.
    """

    def __init__(self, location: str | os.PathLike, *, threads: int = 0):
        loc = os.fspath(location)
        self._location_arg = loc
        self._threads = int(threads)
        self._open(loc)

    # -- opening, pickling, fork ---------------------------------------------------

    def _open(self, loc: str) -> None:
        native = _native.Reader(loc)
        self._native = native
        self._pid = os.getpid()
        self.location: str = native.location
        self.spec: dict = json.loads(native.spec_json())
        self.arrays: dict[str, ArrayInfo] = {
            name: ArrayInfo(name, dtype if dtype == "string" else DTYPES[dtype], tuple(shape))
            for name, dtype, shape in native.arrays()
        }
        parts, start = [], 0
        for name, samples, source in native.parts():
            parts.append(Part(name, samples, source, start))
            start += samples
        self.parts: list[Part] = parts
        self._nonempty = [p for p in parts if p.samples]
        self._starts = [p.start for p in self._nonempty]
        self._len = start
        self.uncommitted_parts: list[str] = list(native.uncommitted_parts())
        self._null_names: list[str] | None = None

    @property
    def _reader(self):
        if self._pid != os.getpid():
            # Forked (a DataLoader worker): the parent's reader holds its file handles
            # and threads; this process opens its own. The old one is kept, never used
            # nor dropped here.
            _ORPHANS.append(self._native)
            self._native = _native.Reader(self._location_arg)
            self._pid = os.getpid()
        return self._native

    def __getstate__(self):
        return {"location": self._location_arg, "threads": self._threads}

    def __setstate__(self, state):
        self._location_arg = state["location"]
        self._threads = state["threads"]
        self._open(self._location_arg)

    def __repr__(self) -> str:
        return (
            f"tensorbake.Store({self.location!r}, samples={self._len}, "
            f"parts={len(self.parts)}, features={sorted(self.features)})"
        )

    # -- spec --------------------------------------------------------------------

    @property
    def features(self) -> dict[str, dict]:
        """The feature arrays: name -> ``{model, weights_sha256, preprocess, dtype, shape}``."""
        return self.spec["features"]

    @property
    def models(self) -> dict[str, str]:
        """Feature -> the model that made it."""
        return {k: v["model"] for k, v in self.features.items()}

    @property
    def weights_sha256(self) -> dict[str, str]:
        """Feature -> sha256 of the model weights."""
        return {k: v["weights_sha256"] for k, v in self.features.items()}

    @property
    def preprocessing(self) -> dict[str, Any]:
        """Feature -> the preprocessing of the model input."""
        return {k: v["preprocess"] for k, v in self.features.items()}

    @property
    def resolution(self) -> int | None:
        """Target image resolution in pixels (``None`` for text-only stores)."""
        return self.spec.get("resolution")

    @property
    def captions(self) -> Any:
        """The caption cleaning configuration the ``caption`` array was made with."""
        return self.spec.get("captions")

    @property
    def metadata(self) -> Any:
        """Free-form information recorded by the creator (dataset, versions)."""
        return self.spec.get("metadata")

    # -- index ---------------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    def part(self, name: str) -> Part:
        """The committed part ``name``.

        Raises :class:`UncommittedPartError` for a part without a commit marker and
        :class:`UnknownPartError` for a name the store does not have.
        """
        for p in self.parts:
            if p.name == name:
                return p
        if name in self.uncommitted_parts:
            raise UncommittedPartError(
                f"store {self.location}: part {name} is not committed (no commit marker; "
                "its writer has not finished or died), so it is invisible to readers; "
                "the next `tensorbake run` redoes it",
                store=self.location,
                part=name,
            )
        raise UnknownPartError(
            f"store {self.location} has no part {name!r} "
            f"(committed parts: {', '.join(p.name for p in self.parts) or 'none'})",
            store=self.location,
            part=name,
        )

    def locate(self, index: int) -> tuple[Part, int]:
        """The part of global sample ``index`` and its row in that part."""
        i = self._index(index)
        p = self._nonempty[bisect.bisect_right(self._starts, i) - 1]
        return p, i - p.start

    def part_rows(self, part: str, rows: Iterable[int] | None = None) -> np.ndarray:
        """Global indices of rows ``rows`` (all when ``None``) of part ``part``; raises
        as :meth:`part` does for an uncommitted or unknown part."""
        p = self.part(part)
        if rows is None:
            return np.arange(p.start, p.stop, dtype=np.int64)
        r = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64)
        if r.size and (r.min() < -p.samples or r.max() >= p.samples):
            raise SampleIndexError(
                f"store {self.location}, part {part}: row out of range (the part has {p.samples} samples)",
                store=self.location,
                part=part,
            )
        return np.where(r < 0, r + p.stop, r + p.start)

    def _index(self, i) -> int:
        i = int(i)
        n = self._len
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise SampleIndexError(
                f"sample {i if i >= 0 else i - n} is out of range: store {self.location} "
                f"has {n} committed samples",
                store=self.location,
            )
        return i

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The shuffled order of epoch ``epoch`` (uint64 global indices): the Rust
        loader's order for the same seed and epoch."""
        return _native.epoch_order(self._len, int(seed), int(epoch))

    # -- reading -------------------------------------------------------------------

    def _names(self, features: Sequence[str] | str | None) -> list[str]:
        if features is None:
            return list(self.arrays)
        if isinstance(features, str):
            features = [features]
        names = ["key"] + [f for f in features if f != "key"]
        return list(dict.fromkeys(names))

    def _indices(self, indices) -> np.ndarray:
        if isinstance(indices, slice):
            return np.arange(*indices.indices(self._len), dtype=np.uint64)
        idx = np.asarray(indices)
        if idx.ndim != 1:
            idx = idx.reshape(-1)
        if idx.size == 0:
            return np.zeros(0, dtype=np.uint64)
        if idx.dtype.kind not in "iu":
            if idx.dtype.kind == "f" and np.all(np.mod(idx, 1) == 0):
                idx = idx.astype(np.int64)
            else:
                raise TypeError(f"sample indices must be integers, not {idx.dtype}")
        if idx.dtype.kind == "i":
            lo = int(idx.min())
            if lo < 0:
                idx = np.where(idx < 0, idx + self._len, idx)
                lo = int(idx.min())
            if lo < 0:
                raise SampleIndexError(
                    f"sample {lo - self._len} is out of range: store {self.location} has "
                    f"{self._len} committed samples",
                    store=self.location,
                )
        return np.ascontiguousarray(idx, dtype=np.uint64)

    def _typed(self, raw: dict, n: int | None, as_torch: bool) -> dict:
        out = {}
        for name, value in raw.items():
            info = self.arrays[name]
            if info.is_string:
                out[name] = value if n is not None else value[0]
                continue
            shape = (n, *info.shape) if n is not None else info.shape
            a = value.view(info.dtype).reshape(shape)
            out[name] = to_torch(a) if as_torch else a
        return out

    def get_batch(
        self,
        indices,
        features: Sequence[str] | None = None,
        *,
        as_torch: bool = False,
        threads: int | None = None,
        out: Mapping[str, Any] | None = None,
    ) -> dict:
        """Samples ``indices`` stacked: ``{array: ndarray [n, *shape]}`` for numeric
        arrays (bfloat16 as ``ml_dtypes.bfloat16``; torch tensors with ``as_torch``),
        ``{array: [str, ...]}`` for ``key`` / ``caption`` / ``caption_raw``.

        ``features`` lists the arrays to read (``key`` is always read); ``None`` reads
        every array. The reads run in parallel on ``threads`` native threads (default:
        as many as the amount of work is worth) with the GIL released.

        ``out``: ``{array: buffer}`` to decode into instead of new arrays (reused
        buffers, shared memory): a C-contiguous NumPy array or CPU torch tensor of the
        array's dtype and shape ``[n, *shape]`` (or of ``uint8`` and that many bytes).
        The result holds ``out``'s objects for those arrays.
        """
        idx = self._indices(indices)
        names = self._names(features)
        t = self._threads if threads is None else int(threads)
        if not out:
            raw = self._reader.read(idx, names, t)
            return self._typed(raw, len(idx), as_torch)
        unknown = set(out) - set(names)
        if unknown:
            raise ValueError(f"out has arrays that are not read: {sorted(unknown)}")
        into = [_as_bytes(out[name]) if name in out else None for name in names]
        raw = self._reader.read(idx, names, t, into)
        result = self._typed(raw, len(idx), as_torch)
        for name in names:
            if name in out:
                result[name] = out[name]
        return {name: result[name] for name in names}

    def sample(self, index: int, features: Sequence[str] | None = None, *, as_torch: bool = False) -> dict:
        """Sample ``index`` (negative counts from the end): ``{array: ndarray of the
        per-sample shape}`` (the decoded buffer itself, no copy), ``str`` for strings."""
        i = self._index(index)
        names = self._names(features)
        raw = self._reader.read(np.array([i], dtype=np.uint64), names, self._threads)
        return self._typed(raw, None, as_torch)

    def __getitem__(self, index):
        if isinstance(index, (slice, list, tuple, np.ndarray)):
            return self.get_batch(index)
        return self.sample(index)

    def __iter__(self):
        for i in range(self._len):
            yield self.sample(i)

    # -- null embeddings -----------------------------------------------------------

    @property
    def null_names(self) -> list[str]:
        """Feature arrays whose null embedding is recorded under ``null/``."""
        if self._null_names is None:
            self._null_names = list(self._reader.null_embeddings())
        return list(self._null_names)

    def null_embedding(self, name: str, *, as_torch: bool = False):
        """The recorded null embedding (empty caption for text features, black image
        for image features) of feature array ``name``, with the per-sample shape;
        ``None`` when it is not recorded. Raises :class:`StoreError` for a name that is
        not a feature of the store."""
        raw = self._reader.null_embedding(name)
        if raw is None:
            return None
        info = self.arrays[name]
        a = raw.view(info.dtype).reshape(info.shape)
        return to_torch(a) if as_torch else a

    def null_embeddings(self, *, as_torch: bool = False) -> dict:
        """Every recorded null embedding: ``{array: ndarray}`` (see :meth:`null_embedding`)."""
        return {name: self.null_embedding(name, as_torch=as_torch) for name in self.null_names}


def _as_bytes(buf) -> np.ndarray:
    """A C-contiguous array or CPU tensor as a flat writable uint8 NumPy view."""
    if not isinstance(buf, np.ndarray):  # a torch tensor
        import torch

        if buf.device.type != "cpu" or not buf.is_contiguous():
            raise ValueError("out tensors must be contiguous CPU tensors")
        buf = buf.view(torch.uint8).numpy() if buf.dtype != torch.uint8 else buf.numpy()
    if not buf.flags.c_contiguous or not buf.flags.writeable:
        raise ValueError("out arrays must be writable and C-contiguous")
    return buf.reshape(-1).view(np.uint8)


def open(location: str | os.PathLike, *, threads: int = 0) -> Store:  # noqa: A001
    """Opens the tensorbake store at ``location``: a directory, ``file://...`` or
    ``s3://bucket/prefix`` (endpoint and credentials from ``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
    ``AWS_ALLOW_HTTP=true`` for plain HTTP).

    ``threads``: native read threads per call (0: chosen from the amount of work).
    """
    return Store(location, threads=threads)


def epoch_order(length: int, seed: int, epoch: int) -> np.ndarray:
    """The Rust loader's order of epoch ``epoch`` for ``length`` samples (a seeded
    Fisher-Yates permutation, uint64)."""
    return _native.epoch_order(int(length), int(seed), int(epoch))
