"""The draft side of one ``DraftModel.Propose`` stream: a proposer on a persistent sequence.

Each round the target sends (discard, append, gamma); :class:`DraftSync`
checks it against what this side holds and the persistent sequence rolls
back, takes the new tokens and generates gamma more, keeping its KV cache
between rounds (:class:`DraftProposer`), or, for a stream that asks for the
``ngram`` method, looks the proposal up in the sequence itself, with no
model (:class:`NgramProposer`). Event loop only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from services.common.errors import InvalidArgument, OutOfRange
from services.engine.async_engine import AsyncEngine, PersistentSequence
from services.engine.sequence import GenerationRequest, SamplingOptions
from services.speculative.ngram import NgramLookup
from services.speculative.sync import DraftSync, Round


@dataclass(frozen=True)
class StreamStart:
    """What the first message of a stream says besides its round."""

    request_id: str
    #: How the draft samples (``max_new_tokens`` is each round's gamma).
    sampling: SamplingOptions
    #: Send each proposal's distribution (the target's verification does not need them).
    want_probs: bool = False
    #: Propose by n-gram lookup in the sequence (no model) instead of with the draft model.
    ngram: bool = False


class DraftProposer:
    """Proposes tokens for one target sequence, round after round."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.sync = DraftSync()
        self._seq: PersistentSequence | None = None

    @property
    def started(self) -> bool:
        return self._seq is not None

    async def propose(self, round_: Round, start: StreamStart | None = None) -> tuple[list[int], list[torch.Tensor]]:
        """Applies ``round_`` and returns the proposed tokens (``round_.gamma``,
        fewer at the context limit; sampled ones drawn with the stream's seed,
        which is the target's) and, when asked, each one's distribution
        (``[vocab]`` tensors). ``start`` is required for the first
        round. Raises InvalidArgument naming the field for a round that breaks
        the protocol, OutOfRange for one past the draft's context or with a
        token id outside its vocabulary (checked before the round touches the
        sync state or the engine, where it would fail the forward pass of the
        whole batch), and what the engine raised for a failed round."""
        vocab = self._engine.engine.vocab_size
        bad = next((t for t in round_.append if not 0 <= t < vocab), None)
        if bad is not None:
            raise OutOfRange("append_tokens", f"token id {bad} is outside the vocabulary [0, {vocab})")
        rollback = self.sync.apply(round_)
        if self._seq is None:
            if start is None:
                raise InvalidArgument("sampling", "the first message must say how to sample")
            # Fewer than gamma where the context ends (the prompt itself must fit: OutOfRange).
            room = self._engine.engine.max_context - len(round_.append)
            sampling = replace(start.sampling, max_new_tokens=max(1, min(round_.gamma, room)))
            self._seq = self._engine.persistent(GenerationRequest(
                prompt_ids=list(round_.append), sampling=sampling, request_id=start.request_id,
                persistent=True, want_probs=start.want_probs))
        else:
            self._seq.resume(rollback, list(round_.append), round_.gamma)
        events = await self._seq.next_round()
        if events[-1].error is not None:
            raise events[-1].error
        tokens = [t for e in events for t in e.token_ids]
        self.sync.proposed(len(tokens))
        return tokens, [p for e in events for p in e.probs]

    def close(self) -> None:
        """Ends the sequence and frees its cache."""
        if self._seq is not None:
            self._seq.close()


class NgramProposer:
    """Proposes by n-gram lookup in one target sequence (prompt lookup decoding,
    :mod:`services.speculative.ngram`), round after round, with the same sync
    protocol as :class:`DraftProposer` and no model: it holds the sequence's
    token ids and its last proposal. Proposes fewer than gamma tokens (none
    when the sequence's end does not occur earlier in it)."""

    def __init__(self, vocab_size: int) -> None:
        self._vocab_size = vocab_size
        self._lookup = NgramLookup()

    async def propose(self, round_: Round, start: StreamStart | None = None) -> tuple[list[int], list[torch.Tensor]]:
        """Applies ``round_`` and returns the proposal (no distributions).
        Raises InvalidArgument naming the field for a round that breaks the
        protocol or asks for distributions, OutOfRange for a token id outside
        the vocabulary."""
        bad = next((t for t in round_.append if not 0 <= t < self._vocab_size), None)
        if bad is not None:
            raise OutOfRange("append_tokens", f"token id {bad} is outside the vocabulary [0, {self._vocab_size})")
        if start is not None and start.want_probs:
            raise InvalidArgument("want_probs", "the ngram method has no draft distributions to send")
        return self._lookup.round(round_), []

    def close(self) -> None:
        """Nothing to free beyond the token list."""
