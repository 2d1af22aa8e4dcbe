"""What the engine asks of speculative decoding: a strategy called at named points.

The engine knows nothing of proposers, acceptance rules or gamma; it batches.
A speculation strategy (``services.speculative.Speculator`` in the target
service) is handed to the engine and called, on the engine thread only, at:

- ``open``            when a request that speculates is submitted (caller's thread);
- ``before_schedule`` at the start of every step;
- ``after_forward``   after each forward pass, with its rows and seconds (the cost it measures);
- ``after_verify``    after the forward pass that scored a row's proposal;
- ``after_emit``      once the verified tokens were emitted (all of them, or fewer
                      when the sequence ended among them): the round's figures;
- ``after_tokens``    after a sequence took new tokens (time for its next round).

A proposal's arrival is the strategy's own business: it comes back on some
other thread and the strategy hands it to the engine thread through the
``post`` function it got in ``open``. The scheduler sees each sequence's state
through :class:`SequenceSpeculation` (hold the step, sit out a step, take the
proposal, drop the round of a preempted sequence). This split mirrors vLLM's
speculative decoding: a proposer, a scorer (here: the engine's batched
forward over the proposed tokens) and a rejection sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from services.engine.scheduler import Row
    from services.engine.sequence import Sequence

#: ``post(fn)`` runs ``fn(now)`` on the engine thread at the next step boundary,
#: ``now`` being the engine's clock (time.monotonic() seconds unless injected).
#: Safe to call from any thread.
Post = Callable[[Callable[[float], None]], None]


@dataclass(frozen=True)
class RoundCounts:
    """A verified round's figures, counting only what the sequence emitted
    (tokens): ``proposed`` proposals whose positions the output has,
    ``accepted`` of them kept, ``emitted`` tokens the round added (accepted
    ones, then the target's own unless the sequence ended before it)."""

    proposed: int
    accepted: int
    emitted: int

    @classmethod
    def of(cls, gamma: int, accepted: int, taken: int, ended: bool) -> "RoundCounts":
        """The figures of a round of ``gamma`` proposals of which ``accepted``
        were kept, when the sequence took ``taken`` of its ``accepted + 1``
        tokens and ``ended`` (finished or paused) in it. A sequence that goes
        on takes them all and every proposal counts (those after a rejection
        were proposed for positions the output fills later); one that ended
        has no positions past its end, so proposals there count as neither
        proposed nor accepted: a stop sequence met at token 29 gives the same
        figures whether max_new_tokens is 29 or 32."""
        if not ended:
            return cls(gamma, accepted, accepted + 1)
        return cls(min(gamma, taken), min(accepted, taken), taken)


class SequenceSpeculation(Protocol):
    """One sequence's speculation state (``Sequence.spec``), engine thread only."""

    #: Counts for the sequence's events (opaque to the engine).
    stats: Any

    def hold(self, now: float) -> float | None:
        """Until when the whole step may wait for this sequence's proposal
        (engine-clock seconds), or None when it does not ask to."""

    def awaits(self, now: float) -> float | None:
        """The deadline (engine-clock seconds) until which this sequence sits
        out steps waiting for its proposal, or None when it may run now (a
        round past its deadline is given up here)."""

    def take_proposal(self) -> list[int]:
        """The proposal to score in this step's row (``[]`` when there is
        none). The proposal is handed out once."""

    def preempted(self) -> None:
        """The sequence was preempted (its KV cache taken back; it recomputes
        when it runs again): the round under way, asked or answered and not
        verified, is abandoned, so that a late answer is ignored and no
        proposal is scored at positions its recompute moves past."""

    def close(self) -> None:
        """The sequence finished: end its speculation and release its proposer."""


class Speculation(Protocol):
    """A speculative-decoding strategy the engine calls at named points."""

    def open(self, request: Any, post: Post) -> SequenceSpeculation:
        """The state of a sequence whose request carries ``request`` (the
        strategy's own request type). Called on the submitting thread before
        the sequence reaches the engine. Raises InvalidArgument for a request
        the strategy cannot serve."""

    def before_schedule(self, running: list["Sequence"], demand: int) -> None:
        """Start of a step; ``demand`` is the sequences running or waiting."""

    def after_forward(self, rows: list["Row"], seconds: float, now: float) -> None:
        """One forward pass ran ``rows`` (decode and verify rows, or prefill
        chunks) in ``seconds``, ending at ``now`` (engine clock)."""

    def after_verify(self, seq: "Sequence", row: "Row", logits: "torch.Tensor") -> list[int]:
        """``row`` carried a proposal of gamma tokens and ``logits``
        (``[gamma + 1, vocab]``) are the target's scores for it. Returns the
        tokens the sequence takes: the accepted proposals, then one token of
        the target's own (so 1 to gamma + 1 tokens)."""

    def after_emit(self, seq: "Sequence", counts: RoundCounts) -> None:
        """The tokens :meth:`after_verify` returned for ``seq`` were emitted
        (before the sequence's last event if it ended): ``counts`` are the
        round's figures for its statistics."""

    def after_tokens(self, seq: "Sequence", now: float, demand: int, room: int) -> None:
        """``seq`` took new tokens and still runs: the moment to ask for its
        next proposal. ``room`` is how many tokens it may take beyond the
        next one (budget and context); ``demand`` as in :meth:`before_schedule`."""
