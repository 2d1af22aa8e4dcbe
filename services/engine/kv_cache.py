"""A paged KV cache: a pool of fixed-size blocks of token positions, per layer.

Keys and values live in ``[num_blocks, block_size, kv_heads, head_dim]``
tensors (vLLM's PagedAttention layout, one pair per layer); which block holds
which sequence's positions is the block manager's business
(:mod:`services.engine.block_manager`, engine thread), and each forward row
brings its block table, so the cache holds nothing but tensors (a rank of a
sharded model needs no bookkeeping of its own). The tensors are allocated
with ``torch.empty`` (untouched pages cost no memory) and zeroed block by
block before first use: a batch reads every row up to the longest row's
length and masks the rest by addition, and stale memory may hold NaN, which
such a mask does not remove. Blocks are first handed out in increasing id,
so "every block below a high-water mark is clean" is all there is to track,
and every rank computes the same mark from the same rows.
"""

from __future__ import annotations

import re

import torch

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """Bytes from ``"2GiB"``, ``"512 MiB"``, ``"1.5GB"`` or ``"1048576"``.
    Raises ValueError naming the accepted units."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (a number with an optional unit: B, KiB, MiB, GiB, KB, MB, GB)")
    return int(float(m.group(1)) * _UNITS[unit])


class PagedKVCache:
    """Per layer, keys and values as ``[num_blocks, block_size, kv_heads,
    head_dim]`` tensors of ``dtype`` on ``device``; :attr:`layers` holds them
    viewed flat, ``[num_blocks * block_size, kv_heads, head_dim]``, indexed by
    slot = block id * block_size + offset. Owned by the model runner, used on
    the engine thread (or a rank's thread) only."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks * block_size, kv_heads, head_dim)
        self.layers = [(torch.empty(shape, dtype=dtype, device=device),
                        torch.empty(shape, dtype=dtype, device=device)) for _ in range(num_layers)]
        self._clean = 0  # blocks [0, clean) are finite
        self.ensure_clean(1)  # the null block

    @property
    def capacity_tokens(self) -> int:
        """Token positions over all blocks but the null block."""
        return (self.num_blocks - 1) * self.block_size

    def ensure_clean(self, upto_block: int, chunk: int = 64) -> None:
        """Makes blocks below ``upto_block`` finite (zeroing, ``chunk`` blocks
        at least at a time, those never zeroed)."""
        if upto_block <= self._clean:
            return
        end = min(self.num_blocks, max(upto_block, self._clean + chunk))
        lo, hi = self._clean * self.block_size, end * self.block_size
        for k, v in self.layers:
            k[lo:hi].zero_()
            v[lo:hi].zero_()
        self._clean = end


__all__ = ["PagedKVCache", "parse_bytes"]
