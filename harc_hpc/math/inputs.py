"""One task's router inputs as a re-iterable sequence of ``(n, d)`` token chunks.

The solver applies its operator hundreds of times, so every pass must see the same chunks in the
same order: that fixed order is what makes the float64 reductions (and so the result) reproducible
bit for bit. An in-memory tensor is cut into fixed-size views; any other re-iterable (a Zarr chunk
reader) is streamed, and kept in memory after the first pass when it fits in ``cache_bytes``.

``keep_input_dtype`` keeps the resident copy in the dtype the chunks arrive in when that is
narrower than the compute dtype (bfloat16 from the activation store) and converts one chunk at a
time when it is used: a layer's inputs then take their storage size (half of float32, a quarter of
float64) plus one chunk, and the operator sees the same values as with a compute-dtype copy (the
widening conversion is exact).

``intercept`` appends a column of ones to every chunk, so that a router with a bias (GPT-OSS) is
calibrated as the (K, d + 1) matrix [W | b] on inputs [x, 1]: the bias is one more input column of
the same system, with no other change to the operator, the statistics or the solver.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, Union

import torch

TokenInput = Union[torch.Tensor, Iterable[torch.Tensor]]

DEFAULT_CHUNK_TOKENS = 16384


class TokenChunks:
    def __init__(
        self,
        source: TokenInput,
        *,
        dim: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        cache_bytes: int = 0,
        keep_input_dtype: bool = False,
        intercept: bool = False,
    ):
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be >= 1")
        self.intercept = intercept
        self.dim = dim
        self.dtype = dtype
        self.device = device
        self.keep_input_dtype = keep_input_dtype
        self._stream: Optional[Iterable[torch.Tensor]] = None
        self._chunks: Optional[list[torch.Tensor]] = None
        self._cache_bytes = cache_bytes
        self.num_tokens: Optional[int] = None
        if torch.is_tensor(source):
            if source.ndim != 2:
                raise ValueError(f"router inputs must be (tokens, d), got shape {tuple(source.shape)}")
            x = self._convert(source, keep=True)
            self._chunks = [x[s : s + chunk_tokens] for s in range(0, x.shape[0], chunk_tokens)]
            self.num_tokens = int(x.shape[0])
        else:
            if iter(source) is source:
                raise TypeError(
                    "router inputs must be a tensor or a re-iterable of chunk tensors; "
                    "a one-shot iterator/generator cannot be replayed on every operator application"
                )
            self._stream = source

    def _convert(self, x: torch.Tensor, keep: bool = False) -> torch.Tensor:
        """``x`` on the device in the compute dtype; with ``keep``, in the dtype it is kept in."""
        if not torch.is_tensor(x) or x.ndim != 2:
            raise ValueError("every chunk of router inputs must be a 2-D tensor (n, d)")
        if self.intercept:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        if self.dim is None:
            self.dim = int(x.shape[1])
        elif x.shape[1] != self.dim:
            extra = " (+1: the bias column)" if self.intercept else ""
            raise ValueError(f"router input width {x.shape[1] - self.intercept}{extra} != router width {self.dim}")
        if self.dtype is None:
            self.dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        narrower = x.is_floating_point() and x.element_size() < self.dtype.itemsize
        return x.to(device=self.device, dtype=x.dtype if keep and self.keep_input_dtype and narrower else self.dtype)

    def _compute(self, kept: torch.Tensor) -> torch.Tensor:
        return kept if kept.dtype == self.dtype else kept.to(self.dtype)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._chunks is not None:
            for c in self._chunks:
                yield self._compute(c)
            return
        kept: Optional[list[torch.Tensor]] = [] if self._cache_bytes > 0 else None
        size = 0
        count = 0
        for raw in self._stream:
            x = self._convert(torch.as_tensor(raw), keep=True)
            if x.shape[0] == 0:
                continue
            count += int(x.shape[0])
            if kept is not None:
                size += x.numel() * x.element_size()
                if size <= self._cache_bytes:
                    kept.append(x)
                else:
                    kept = None
            yield self._compute(x)
        if self.num_tokens is None:
            self.num_tokens = count
        elif count != self.num_tokens:
            raise RuntimeError(f"re-iterating the inputs gave {count} tokens, previously {self.num_tokens}")
        if kept is not None:
            self._chunks = kept
            self._stream = None

    def resident_chunks(self) -> Optional[list[torch.Tensor]]:
        """The resident chunks as kept (possibly narrower than the compute dtype); None while streamed."""
        return self._chunks

    def count_tokens(self) -> int:
        if self.num_tokens is None:
            for _ in self:
                pass
        return int(self.num_tokens or 0)
