"""Chained hashes of a token sequence's full KV-cache blocks (automatic prefix caching).

A full block of ``block_size`` token ids is named by a hash over its parent
block's hash and its own token ids, so equal hashes mean equal prefixes, not
only equal blocks (vLLM v1 ``kv_cache_utils.hash_block_tokens``; SGLang's
radix tree keys on the same prefix relation). The engine (which stores blocks)
and the router (which predicts where a prompt's blocks are stored) both call
:func:`block_hashes`, so a hit the router predicts is the hit the target
serves. Pure Python (hashlib SHA-256), any thread.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

#: Parent of a sequence's first block (a version tag: change it and every hash changes).
ROOT = b"llmesh-kv-v1"


def hash_block(parent: int | None, token_ids: Sequence[int]) -> int:
    """The 64-bit hash (unsigned int) of one full block whose previous block
    hashes to ``parent`` (None for the first block)."""
    h = hashlib.sha256(ROOT if parent is None else parent.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return int.from_bytes(h.digest()[:8], "little")


def block_hashes(token_ids: Sequence[int], block_size: int, start: Sequence[int] = ()) -> list[int]:
    """Hashes of every full block of ``token_ids`` (``len(token_ids) // block_size``
    of them); ``start``: hashes already known for its first blocks (extended, not
    recomputed). Raises ValueError for a block size below 1."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    out = list(start)
    for i in range(len(out), len(token_ids) // block_size):
        out.append(hash_block(out[-1] if out else None, token_ids[i * block_size:(i + 1) * block_size]))
    return out


__all__ = ["ROOT", "block_hashes", "hash_block"]
