"""Floating dtypes by the names configs use (``float32``, ``bfloat16``, ...): the one map."""

from __future__ import annotations

from typing import Optional, Union

import torch

from harc_hpc.errors import UsageError

FLOAT_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}


def torch_dtype(name: Optional[Union[str, torch.dtype]], error: type = UsageError) -> Optional[torch.dtype]:
    """The torch dtype called ``name`` (None and torch dtypes pass through); ``error`` otherwise."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return FLOAT_DTYPES[name]
    except KeyError:
        raise error(f"unknown dtype {name!r}; use one of {sorted(FLOAT_DTYPES)}") from None


def itemsize(dtype: Union[str, torch.dtype], default: Optional[int] = None) -> int:
    """Bytes per element of a floating dtype, named as configs name it (``bfloat16``) or a torch dtype:
    ``torch.dtype.itemsize``, the one item-size table. ``default``: for a name that is not one of
    them (``auto``, a checkpoint's unusual dtype) instead of an error."""
    if default is not None and isinstance(dtype, str) and dtype not in FLOAT_DTYPES:
        return default
    return torch_dtype(dtype).itemsize
