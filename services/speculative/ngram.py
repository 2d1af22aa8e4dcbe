"""Model-free proposals by n-gram lookup in the sequence itself.

Prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; vLLM's
``ngram`` speculative method, transformers' ``prompt_lookup_num_tokens``):
find the latest earlier occurrence of the sequence's last ``n`` tokens
(``n`` from ``max_n`` down to ``min_n``) and propose the tokens that
followed it. Free to compute and often right where the output copies its
context (edits, summaries, code that repeats names). Verification is the
usual rule (greedy: the target's argmax; sampled: the Gumbel-coupled rule,
which is exact for any proposer), so output is unchanged.

Pure (numpy over token ids); any thread.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

#: Longest and shortest suffix looked up (tokens), vLLM's prompt_lookup_max/min.
MAX_N = 4
MIN_N = 2


def propose_ngram(tokens: list[int] | np.ndarray, gamma: int, max_n: int = MAX_N, min_n: int = MIN_N) -> list[int]:
    """Up to ``gamma`` tokens that followed the latest earlier occurrence of the
    longest suffix of ``tokens`` (``max_n`` down to ``min_n`` tokens long) that
    occurs earlier; ``[]`` when none does. ``tokens`` is the whole sequence
    (prompt and output)."""
    arr = np.asarray(tokens, dtype=np.int64)
    size = len(arr)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        # Windows starting before the suffix itself; a match at i is followed by arr[i + n:].
        windows = sliding_window_view(arr[:size - 1], n)
        hits = np.flatnonzero((windows == arr[size - n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return arr[start:start + gamma].tolist()
    return []
