"""Exceptions of the tensorbake reader.

Every error is a :class:`StoreError`. Its message is the store's own error text, which
names the store and, where they are known, the part and the array (and the storage key
or the cause, such as a failed checksum or a refused connection); the same facts are
attributes: ``store``, ``part``, ``array``, ``key`` (``None`` where not known).

Subclasses also derive from the built-in exception a caller would expect:

===========================  ==============================================================
``NotAStoreError``           no tensorbake store at the location
``InvalidLocationError``     not a path, ``file://`` or ``s3://bucket/prefix`` (``ValueError``)
``StoreIOError``             reading, listing or connecting failed (``OSError``)
``CorruptDataError``         damaged bytes: a checksum or decompression failed
``MetadataError``            a ``zarr.json`` is not what tensorbake writes
``UnknownArrayError``        no such array / feature in the store (``KeyError``)
``SampleIndexError``         sample index out of range (``IndexError``)
``UnknownPartError``         no such part (``KeyError``)
``UncommittedPartError``     the part exists but is not committed (invisible to readers)
===========================  ==============================================================
"""

from __future__ import annotations

__all__ = [
    "StoreError",
    "NotAStoreError",
    "InvalidLocationError",
    "StoreIOError",
    "CorruptDataError",
    "MetadataError",
    "UnknownArrayError",
    "SampleIndexError",
    "UnknownPartError",
    "UncommittedPartError",
]


class StoreError(Exception):
    """A tensorbake store could not be opened or read.

    ``str(e)`` is the whole message; ``e.store``, ``e.part``, ``e.array``, ``e.key``
    name what it concerns (``None`` where not applicable).
    """

    def __init__(self, message: str = "", *, store=None, part=None, array=None, key=None):
        super().__init__(message)
        self.store = store
        self.part = part
        self.array = array
        self.key = key

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):  # pickles across DataLoader worker processes
        return (
            _rebuild,
            (type(self), str(self), self.store, self.part, self.array, self.key),
        )


def _rebuild(cls, message, store, part, array, key):
    return cls(message, store=store, part=part, array=array, key=key)


class NotAStoreError(StoreError):
    """There is no tensorbake store at the location (no root ``zarr.json`` with
    ``attributes.tensorbake``)."""


class InvalidLocationError(StoreError, ValueError):
    """The location is not a path, ``file://`` URL or ``s3://bucket/prefix``."""


class StoreIOError(StoreError, OSError):
    """Reading, listing or connecting to the storage failed (a missing file, a closed
    S3 endpoint, refused credentials)."""


class CorruptDataError(StoreError):
    """Stored bytes are damaged: a crc32c checksum, the shard index or decompression
    failed. Run ``tensorbake inspect --verify STORE`` to list every damaged part."""


class MetadataError(StoreError):
    """A metadata document (``zarr.json``) is not what tensorbake writes."""


class UnknownArrayError(StoreError, KeyError):
    """The store has no array (feature) of that name; the message lists the arrays it has."""


class SampleIndexError(StoreError, IndexError):
    """A sample index beyond the committed samples."""


class UnknownPartError(StoreError, KeyError):
    """The store has no part of that name."""


class UncommittedPartError(StoreError):
    """The part exists on storage but has no commit marker: its writer has not finished
    (or died), so readers do not see it; the next run redoes it."""
