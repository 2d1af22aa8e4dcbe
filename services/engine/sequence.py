"""A sequence's state inside the engine, and the events it emits."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.common.metrics import ttft_tpot


class FinishReason(enum.Enum):
    """Why a sequence ended."""

    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"
    CANCELLED = "cancelled"
    ERROR = "error"


class Status(enum.Enum):
    """Where a sequence is in the scheduler."""

    WAITING = "waiting"    # queued, no KV slot yet
    RUNNING = "running"    # holds a slot, scheduled every step
    PAUSED = "paused"      # holds a slot and its cache, waits for more work (draft streams)
    FINISHED = "finished"  # slot freed


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick each next token. temperature 0 is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    #: max_new_tokens is a ceiling: lowered to what the context leaves after the prompt.
    fit_context: bool = False

    @property
    def greedy(self) -> bool:
        """Argmax decoding (temperature 0)."""
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    """What a caller asks of the engine (already decoded from the wire)."""

    prompt_ids: list[int]
    sampling: SamplingOptions
    request_id: str = ""
    priority: int = 0
    #: Absolute time.monotonic() after which the request is cancelled.
    deadline: float | None = None
    #: Tokens already generated elsewhere (failover resume): appended to the
    #: prompt and counted toward max_new_tokens, never emitted again.
    resume_ids: list[int] = field(default_factory=list)
    #: Keep the sequence (and its KV cache) after ``budget`` tokens instead of
    #: finishing: the draft service's streams.
    persistent: bool = False
    #: Return the sampling distribution of each generated token.
    want_probs: bool = False
    #: Return each generated token's log-probability and this many top
    #: alternatives (:class:`TokenLogprob`); None: none.
    logprobs: int | None = None
    #: Return the log-probability of every prompt token (``prompt_ids``) too.
    prompt_logprobs: bool = False
    #: Score the prompt only: its prefill runs (with ``prompt_logprobs`` when asked), nothing is sampled, and
    #: the sequence ends LENGTH with no token (``max_new_tokens`` is not read); the prompt may fill the context.
    scoring: bool = False
    #: Speculative decoding: the engine's Speculation strategy's request type
    #: (services.speculative.state.SpeculationRequest in the target); None: plain decoding.
    speculation: Any = None


@dataclass(frozen=True)
class TokenLogprob:
    """A token's natural-log probability under the model's raw distribution
    (log-softmax of the logits, before temperature, top-k and top-p; None for
    the first prompt token) and the ``top`` most likely (token id, logprob)
    pairs at its position, most likely first."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class SequenceEvent:
    """What a step produced for one sequence. Delivered in step order."""

    token_ids: list[int]
    text: str = ""
    finish_reason: FinishReason | None = None
    #: Per generated token: its distribution (dense probs tensor) when asked.
    probs: list[Any] = field(default_factory=list)
    #: Per generated token, when the request asked for logprobs.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    #: On the sequence's first event, when it asked for prompt_logprobs: one per prompt token.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    #: Persistent sequences: the budget is spent and the sequence waits.
    paused: bool = False
    error: BaseException | None = None
    #: Speculation counts so far (the strategy's, e.g. services.speculative.state.SpecStats), if speculating.
    spec: Any = None
    #: On the finishing event: when the sequence arrived, was admitted, made its
    #: first token and finished (time.monotonic() seconds; None if it never did).
    timeline: "Timeline | None" = None


@dataclass(frozen=True)
class Timeline:
    """When a finished sequence arrived, was admitted, made its first and last
    token and finished: seconds of the engine's clock (time.monotonic() unless
    injected), None for a moment it never reached; ``new_tokens`` it generated
    (resumed tokens excluded)."""

    arrival: float
    admitted: float | None
    first_token: float | None
    finished: float
    last_token: float | None = None
    new_tokens: int = 0

    def ttft_tpot(self) -> tuple[float | None, float | None]:
        """(time to first token, time per output token after the first), seconds
        (:func:`services.common.metrics.ttft_tpot`)."""
        return ttft_tpot(self.arrival, self.first_token, self.last_token, self.new_tokens)


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request's tokens, cache position and bookkeeping (engine-thread owned)."""

    request: GenerationRequest
    sink: Callable[[SequenceEvent], None]
    arrival: float
    seq_id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    prompt_len: int = 0
    #: Tokens of ``tokens`` whose keys and values are in the cache.
    num_cached: int = 0
    #: The sequence's admission slot (a cap on sequences holding cache), or None.
    slot: int | None = None
    #: Paged KV cache (services.engine.block_manager): block ids holding positions
    #: ``[i * block_size, (i + 1) * block_size)``; hashes of its full blocks known so
    #: far; how many of its first blocks are registered in the prefix cache.
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_registered: int = 0
    #: Times its blocks were taken back for others (it recomputed them).
    preemptions: int = 0
    #: In the waiting queue (admission counts it as leaving the queue).
    queued: bool = False
    status: Status = Status.WAITING
    #: Tokens this sequence may still generate before finishing (or pausing).
    budget: int = 0
    generated: int = 0
    cancelled: bool = False
    #: Seed of every draw of this sequence (the request's, or a random one).
    base_seed: int = 0
    detok: Any = None
    #: A persistent sequence's tokens (and distributions) of the round under way,
    #: delivered in one event when it pauses.
    round_tokens: list[int] = field(default_factory=list)
    round_probs: list[Any] = field(default_factory=list)
    #: The speculation strategy's state (services.engine.speculation.SequenceSpeculation)
    #: while the sequence speculates, else None.
    spec: Any = None
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    #: A verified round whose tokens are being emitted: (gamma, accepted,
    #: len(tokens) before them); engine thread.
    verifying: tuple[int, int, int] | None = None
    #: Prompt logprobs gathered over the prefill's chunks, until the first event carries them.
    prompt_logprobs: list[TokenLogprob] | None = None

    def __post_init__(self) -> None:
        self.tokens = list(self.request.prompt_ids) + list(self.request.resume_ids)
        self.prompt_len = len(self.tokens)
        self.generated = len(self.request.resume_ids)
        self.budget = self.request.sampling.max_new_tokens - self.generated

    @property
    def priority(self) -> int:
        """The request's scheduling priority (higher first)."""
        return self.request.priority

    @property
    def pending(self) -> int:
        """Tokens to feed through the model before the next one can be sampled."""
        return len(self.tokens) - self.num_cached

    def next_round(self, discard: int, append: list[int], budget: int, max_context: int) -> None:
        """A persistent sequence's next round: drops its last ``discard``
        tokens, takes ``append`` and may generate ``budget`` more (at least 1,
        within ``max_context``). Cached keys past the kept tokens are stale and
        will be overwritten; at least one token is left to feed."""
        if discard:
            del self.tokens[len(self.tokens) - discard:]
            self.num_cached = min(self.num_cached, len(self.tokens))
        self.tokens.extend(append)
        self.num_cached = min(self.num_cached, len(self.tokens) - 1)  # something must be fed to sample
        self.budget = max(1, min(budget, max_context - len(self.tokens)))

    def expired(self, now: float) -> bool:
        """Whether the request's deadline (engine-clock seconds) has passed at ``now``."""
        return self.request.deadline is not None and now >= self.request.deadline
