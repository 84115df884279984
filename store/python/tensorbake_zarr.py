"""Register the zarr-extensions `bfloat16` data type with zarr-python 3.

tensorbake stores embeddings as `bfloat16`; zarr-python (3.1) does not ship that data
type, so import this module (or paste it) before opening a tensorbake store:

    import tensorbake_zarr  # noqa: F401  (registers bfloat16)
    import zarr
    root = zarr.open_group("store.zarr", mode="r")

Needs: zarr>=3.1, numpy, ml_dtypes (numpy's bfloat16). Tested with zarr 3.1.6,
ml_dtypes 0.6.0. tensorstore needs none of this: it reads bfloat16 natively.
"""
from dataclasses import dataclass
from typing import ClassVar

import ml_dtypes
import numpy as np
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.npy.float import BaseFloat


@dataclass(frozen=True, kw_only=True)
class BFloat16(BaseFloat):
    """The zarr-extensions `bfloat16` data type, backed by `ml_dtypes.bfloat16`."""

    dtype_cls = type(np.dtype(ml_dtypes.bfloat16))
    _zarr_v3_name = "bfloat16"
    _zarr_v2_names: ClassVar[tuple[str, ...]] = ()

    @property
    def item_size(self) -> int:
        return 2


if "bfloat16" not in data_type_registry.contents:
    data_type_registry.register(BFloat16._zarr_v3_name, BFloat16)
