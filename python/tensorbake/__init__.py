"""tensorbake: read tensorbake stores (baked diffusion-encoder outputs, Zarr v3) from
NumPy and PyTorch, through tensorbake-store's own Rust reader.

    import tensorbake
    store = tensorbake.open("pd12m-512.zarr")          # or "s3://bucket/prefix"
    store.features["siglip_hidden"]["model"]           # the spec
    sample = store[17]                                 # {array: ndarray}, str for key/caption
    batch = store.get_batch([3, 1, 4], features=["siglip_hidden", "t5_hidden"], as_torch=True)
    nulls = store.null_embeddings()                    # {"t5_hidden": ndarray, ...}

    from tensorbake.torch import StoreIterableDataset  # shuffled, split by rank and worker

See docs/python.md.
"""

from . import _native
from ._store import DTYPES, ArrayInfo, Part, Store, epoch_order, open, to_torch
from .errors import (
    CorruptDataError,
    InvalidLocationError,
    MetadataError,
    NotAStoreError,
    SampleIndexError,
    StoreError,
    StoreIOError,
    UncommittedPartError,
    UnknownArrayError,
    UnknownPartError,
)

__version__ = _native.__version__

# `open` is left out of __all__ so that `from tensorbake import *` does not shadow the
# built-in; call it as tensorbake.open.
__all__ = [
    "Store",
    "Part",
    "ArrayInfo",
    "DTYPES",
    "epoch_order",
    "to_torch",
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
