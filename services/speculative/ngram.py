"""Model-free proposals by n-gram lookup in the sequence itself.

Prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; vLLM's
``ngram`` speculative method, transformers' ``prompt_lookup_num_tokens``):
find the latest earlier occurrence of the sequence's last ``n`` tokens
(``n`` from ``max_n`` down to ``min_n``) and propose the tokens that
followed it. Free to compute and often right where the output copies its
context (edits, summaries, code that repeats names). Verification is the
usual rule (greedy: the target's argmax; sampled: the Gumbel-coupled rule,
which is exact for any proposer: a lookup is a point-mass proposal), so
output is unchanged.

:func:`propose_ngram` is the pure lookup; :class:`NgramLookup` applies one
sequence's rounds (the sync protocol of :mod:`services.speculative.sync`) and
looks up each proposal, for the draft service's ``ngram`` streams and for
:class:`LocalNgramProposer`, the target's own proposer when it falls back
from the draft model (:mod:`services.speculative.fallback`).
"""

from __future__ import annotations

import time

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from services.speculative.state import Proposal, ProposalCallback
from services.speculative.sync import DraftSync, Round

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


class NgramLookup:
    """One sequence's n-gram proposals, round after round: holds its token ids
    as the sync protocol says (``sync``, as a draft holds its cache) and its
    last proposal. One thread at a time (the caller's)."""

    def __init__(self) -> None:
        self.sync = DraftSync()
        self._tokens: list[int] = []

    def round(self, round_: Round) -> list[int]:
        """Applies ``round_`` and returns up to ``round_.gamma`` proposed tokens
        (``[]`` when the sequence's end does not occur earlier in it). Raises
        InvalidArgument naming the field for a round that breaks the protocol
        (the state is unchanged then)."""
        rollback = self.sync.apply(round_)
        if rollback:
            del self._tokens[-rollback:]
        self._tokens += round_.append
        tokens = propose_ngram(self._tokens, round_.gamma)
        self._tokens += tokens
        self.sync.proposed(len(tokens))
        return tokens


class LocalNgramProposer:
    """A Proposer (``services.speculative.state.Proposer``) that looks its
    proposals up in the target's own process: no draft service, no stream, no
    model. :meth:`propose` answers at once, on the caller's thread (the engine
    thread); the answer still reaches the engine through the Speculator's
    ``post``, like any proposer's, at the next step boundary."""

    #: What the batch waits for (the cost model keeps each kind's costs apart).
    kind = "ngram"
    #: No model, so no context limit.
    max_context = None

    def __init__(self) -> None:
        self._lookup = NgramLookup()

    def propose(self, round_: Round, on_result: ProposalCallback) -> None:
        started = time.perf_counter()
        try:
            tokens = self._lookup.round(round_)
        except Exception as exc:  # noqa: BLE001 - reported like a draft's failure: the sequence decodes on
            on_result(None, exc)
            return
        on_result(Proposal(tokens, (time.perf_counter() - started) * 1000.0), None)

    def close(self) -> None:
        """Nothing to free beyond the token list."""
