"""A slot KV cache: one fixed row of positions per sequence, per layer.

Keys and values live in ``[num_slots, max_len, kv_heads, head_dim]`` tensors
allocated with ``torch.empty``, so untouched pages cost no memory. A batch
reads every row's slot up to the longest row's length, so positions a row has
not written are read too (and masked): they are zeroed before first use, in
chunks, because stale memory may hold NaN, which a mask applied by addition
does not remove. A sequence
owns one slot from admission to finish (the scheduler hands slots out);
rolling back (speculation) is just lowering its cached length, since
positions past it are overwritten.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Per layer, keys and values as ``[num_slots, max_len, kv_heads, head_dim]``
    tensors of ``dtype`` on ``device`` (see the module docstring). Owned by the
    model runner, used on the engine thread only; positions are token indices."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        self.num_slots = num_slots
        self.max_len = max_len
        shape = (num_slots, max_len, kv_heads, head_dim)
        self.layers = [(torch.empty(shape, dtype=dtype, device=device),
                        torch.empty(shape, dtype=dtype, device=device)) for _ in range(num_layers)]
        self._clean = [0] * num_slots  # positions [0, clean) of each slot are finite

    @property
    def capacity_tokens(self) -> int:
        """Tokens the cache can hold over all slots."""
        return self.num_slots * self.max_len

    def ensure_clean(self, slots: list[int], upto: int, chunk: int = 256) -> None:
        """Makes positions below ``upto`` of each slot finite (zeroing, ``chunk``
        positions at least at a time, what was never written)."""
        for slot in slots:
            start = self._clean[slot]
            if start >= upto:
                continue
            end = min(self.max_len, max(upto, start + chunk))
            for k, v in self.layers:
                k[slot, start:end].zero_()
                v[slot, start:end].zero_()
            self._clean[slot] = end
