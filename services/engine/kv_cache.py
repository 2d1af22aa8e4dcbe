"""A slot KV cache: one fixed row of positions per sequence, per layer.

Keys and values live in ``[num_slots, max_len, kv_heads, head_dim]`` tensors
allocated with ``torch.empty``, so untouched pages cost no memory. A sequence
owns one slot from admission to finish (the scheduler hands slots out);
rolling back (speculation) is just lowering its cached length, since
positions past it are overwritten.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        self.num_slots = num_slots
        self.max_len = max_len
        shape = (num_slots, max_len, kv_heads, head_dim)
        self.layers = [(torch.empty(shape, dtype=dtype, device=device),
                        torch.empty(shape, dtype=dtype, device=device)) for _ in range(num_layers)]

    @property
    def capacity_tokens(self) -> int:
        return self.num_slots * self.max_len
