"""The engine: continuous batching around a model runner.

One thread runs ``step()`` in a loop: schedule, forward, sample, advance.
Other threads talk to it only through :meth:`submit`, :meth:`cancel` and
:meth:`resume`, which enqueue commands applied at the next step boundary, so
the scheduler's state has a single owner.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.common.errors import FailedPrecondition, ResourceExhausted
from services.engine import sampler
from services.engine.detokenizer import Detokenizer
from services.common.metrics import WindowedMetrics, MetricsSnapshot
from services.engine.model_runner import ForwardRow, ModelRunner
from services.engine.scheduler import Row, Scheduler
from services.engine.sequence import FinishReason, GenerationRequest, Sequence, SequenceEvent, Status, Timeline
from services.engine.settings import EngineSettings
from services.engine.validation import validate
from services.speculative.acceptance import accept_greedy, accept_sampled
from services.speculative.gamma import SpeculationSettings

log = logging.getLogger(__name__)


@dataclass
class EngineLoad:
    """The engine's state at one moment, for load reports."""

    queue_length: int
    running: int
    paused: int
    max_batch_size: int
    kv_used_tokens: int
    kv_capacity_tokens: int
    metrics: MetricsSnapshot


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, settings: EngineSettings,
                 eos_token_ids: list[int] | None = None, metrics_window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic,
                 speculation: SpeculationSettings | None = None) -> None:
        settings.validate()
        self.speculation = speculation or SpeculationSettings()
        self.runner = runner
        self.tokenizer = tokenizer
        self.settings = settings
        self.eos_token_ids = set(eos_token_ids or [])
        self.clock = clock
        self.scheduler = Scheduler(settings)
        self.metrics = WindowedMetrics(metrics_window_s, started_at=clock())
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._queued = 0  # submitted but not yet admitted (or dropped)
        self._queued_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def max_context(self) -> int:
        return self.runner.max_len

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    # -- API for other threads ----------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Callable[[SequenceEvent], None]) -> Sequence:
        """Queues a request; ``sink`` receives its events on the engine thread.

        Raises InvalidArgument/OutOfRange for a request the model cannot serve
        and ResourceExhausted when ``max_queue`` requests are already waiting.
        """
        validate(request, self.vocab_size, self.max_context)
        with self._queued_lock:
            if self._queued >= self.settings.max_queue:
                self.metrics.record_rejected()
                raise ResourceExhausted(
                    f"the queue is full ({self.settings.max_queue} requests waiting); retry shortly",
                    retry_after_s=self._retry_hint())
            self._queued += 1
        seq = Sequence(request=request, sink=sink, arrival=self.clock())
        if not request.persistent:
            seq.detok = Detokenizer(self.tokenizer, seq.tokens, request.sampling.stop)
        seq.base_seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
        if request.speculation is not None:
            seq.spec = request.speculation.state()
        self._command(lambda: self._add(seq))
        return seq

    def cancel(self, seq: Sequence) -> None:
        """The sequence leaves the batch at the next step; its slot is freed then."""
        seq.cancelled = True
        self._wake.set()

    def resume(self, seq: Sequence, discard: int, append: list[int], budget: int) -> None:
        """A paused persistent sequence drops its last ``discard`` tokens, takes
        ``append`` and generates ``budget`` more."""
        self._command(lambda: self._resume(seq, discard, append, budget))

    def update_settings(self, **changes) -> EngineSettings:
        """Applies knob changes (validated) at the next step boundary."""
        candidate = EngineSettings(**{**vars(self.settings), **changes})
        candidate.validate()
        if candidate.num_slots != self.settings.num_slots:
            raise FailedPrecondition("num_slots cannot change while the engine runs")
        self._command(lambda: setattr(self.scheduler, "settings", candidate) or setattr(self, "settings", candidate))
        return candidate

    def load(self) -> EngineLoad:
        s = self.scheduler
        return EngineLoad(queue_length=self._queued, running=len(s.running), paused=len(s.paused),
                          max_batch_size=self.settings.max_batch_size, kv_used_tokens=s.cached_tokens,
                          kv_capacity_tokens=self.runner.cache.capacity_tokens,
                          metrics=self.metrics.snapshot(self.clock()))

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmesh-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def run_once(self) -> bool:
        """Applies pending commands and runs one step (for callers that drive the
        engine themselves instead of :meth:`start`)."""
        self._apply_commands()
        return self.step()

    def _run(self) -> None:
        wake_at = None
        while not self._stopping:
            self._apply_commands()
            if self.step():
                continue
            wake_at = self._wake_at
            timeout = None if wake_at is None else max(0.0, wake_at - self.clock())
            if self._commands.empty():
                self._wake.wait(timeout)
            self._wake.clear()

    # -- the step ------------------------------------------------------------------------
    def step(self) -> bool:
        """One scheduling iteration. Returns False when there was nothing to run."""
        if self._over_break_even():
            self._stand_down_speculation()
        plan = self.scheduler.schedule(self.clock())
        for _ in plan.admitted:
            self._dequeued()
        for seq in plan.dropped:
            self._finish(seq, FinishReason.CANCELLED, [])
        self._wake_at = plan.wake_at
        if not plan.rows:
            return False
        logits, busy_s = self._forward(plan.rows)
        self._advance(plan.rows, logits)
        self.metrics.record_step(self.clock(), len(plan.rows), plan.tokens, self._computed, busy_s)
        return True

    _wake_at: float | None = None
    _computed: int = 0

    def _forward(self, rows: list[Row]) -> tuple[list[torch.Tensor], float]:
        """Decode and verify rows run in one forward, prefill chunks in another
        (so decodes are not padded to a prompt's length)."""
        groups = [[i for i, r in enumerate(rows) if r.chunk == 1], [i for i, r in enumerate(rows) if r.chunk > 1]]
        out: list[torch.Tensor | None] = [None] * len(rows)
        busy = 0.0
        self._computed = 0
        for group in groups:
            if not group:
                continue
            fwd = [ForwardRow(rows[i].seq.slot, rows[i].start,
                              rows[i].seq.tokens[rows[i].start:rows[i].start + rows[i].chunk] + rows[i].draft,
                              keep=1 + len(rows[i].draft)) for i in group]
            try:
                logits, took = self.runner.timed_forward(fwd)
            except Exception as exc:  # noqa: BLE001 - fans out to every sequence in the batch
                log.exception("forward pass failed for %d sequences", len(group))
                for i in group:
                    self._fail(rows[i].seq, exc)
                continue
            busy += took
            for i in group:
                rows[i].forward_s = took
            self._computed += len(group) * max(len(r.tokens) for r in fwd)
            for i, lg in zip(group, logits):
                out[i] = lg
        return out, busy

    def _advance(self, rows: list[Row], logits: list[torch.Tensor | None]) -> None:
        now = self.clock()
        produced = 0
        for row, lg in zip(rows, logits):
            seq = row.seq
            if lg is None or seq.status is not Status.RUNNING:
                continue
            seq.num_cached = row.start + row.chunk
            if not row.completes:
                continue  # a partial prefill chunk: nothing to sample yet
            if row.draft:
                produced += self._verify(seq, row, lg, now)
            else:
                opts = seq.request.sampling
                token, probs = sampler.sample(lg[-1], opts, seq.base_seed, len(seq.tokens), seq.request.want_probs)
                produced += 1
                self._emit_token(seq, token, probs, now)
            if seq.spec is not None and seq.status is Status.RUNNING:
                self._maybe_propose(seq, now)
        self.metrics.record_tokens(now, produced)

    # -- speculative decoding ----------------------------------------------------------------
    def _verify(self, seq: Sequence, row: Row, logits: torch.Tensor, now: float) -> int:
        """Accepts a prefix of the draft's proposal by the rejection-sampling rule,
        rolls the cache back past the rejected part, emits the new tokens."""
        opts = seq.request.sampling
        gamma = len(row.draft)
        if opts.greedy:
            n, token = accept_greedy(logits, row.draft)
        else:
            p = sampler.warp(logits, opts)
            n, token = accept_sampled(p, row.q, row.draft, seq.base_seed, len(seq.tokens))
        seq.num_cached = row.start + row.chunk + n  # keys of rejected proposals are overwritten later
        seq.spec.kept = n
        seq.spec.stats.record(n, gamma)
        seq.spec.stats.verify_ms += row.forward_s * 1000.0
        seq.spec.control.update(n, gamma)
        self.metrics.record_speculation(now, 1, gamma, n)
        emitted = 0
        for t in [*row.draft[:n], token]:
            if seq.status is not Status.RUNNING:
                break
            self._emit_token(seq, t, None, now)
            emitted += 1
        return emitted

    def _maybe_propose(self, seq: Sequence, now: float) -> None:
        """Asks the drafter for the next proposal, unless speculation does not pay now."""
        spec = seq.spec
        if not spec.active or spec.waiting or spec.proposal:
            return
        if not spec.control.worth_it(self.speculation):
            spec.disable(f"acceptance {spec.control.ema:.2f} below {self.speculation.min_acceptance}")
            return
        if self._over_break_even():
            return
        gamma = min(spec.control.gamma, seq.budget - 1, self.max_context - len(seq.tokens) - 1)
        if gamma < 1:
            return
        discard = spec.proposal_len - spec.kept
        append = seq.tokens[spec.synced + spec.kept:]
        spec.synced, spec.proposal_len, spec.kept = len(seq.tokens), gamma, 0
        spec.round_id += 1
        spec.waiting = True
        spec.requested_at = now
        spec.deadline = now + self.speculation.draft_timeout_ms / 1000.0
        spec.hold_until = min(spec.deadline, now + self.speculation.draft_hold_ms / 1000.0)
        round_id = spec.round_id
        spec.link.propose(round_id, discard, append, gamma,
                          lambda rid, proposal, error: self._command(
                              lambda: self._on_proposal(seq, rid, proposal, error)))

    def _over_break_even(self) -> bool:
        """Whether the batch is (about to be) large enough that verifying costs more than it saves."""
        return len(self.scheduler.running) + self.scheduler.num_waiting > self.speculation.max_batch

    def _stand_down_speculation(self) -> None:
        """The batch grew past the break-even while rounds were under way: sequences
        stop waiting for their drafts and drop proposals not yet verified, so that
        none sits out a step or widens every row of a big batch to gamma + 1 tokens.
        The draft is told to discard those tokens at the next round, as after a
        timeout."""
        for seq in self.scheduler.running:
            if seq.spec is not None:
                seq.spec.stand_down()

    def _on_proposal(self, seq: Sequence, round_id: int, proposal, error) -> None:
        spec = seq.spec
        if seq.status is not Status.RUNNING or round_id != spec.round_id or not spec.waiting:
            return  # finished, or a late answer to a round that timed out
        spec.waiting = False
        if error is not None:
            spec.disable(f"draft unavailable: {error}")
            return
        spec.stats.draft_wait_ms += (self.clock() - spec.requested_at) * 1000.0
        spec.stats.draft_compute_ms += proposal.compute_ms
        if not proposal.tokens:
            return
        needs_q = not seq.request.sampling.greedy
        if needs_q and (proposal.q is None or len(proposal.q) != len(proposal.tokens)):
            spec.disable("the draft sent no distributions for sampled speculation")
            return
        spec.proposal_len = len(proposal.tokens)
        spec.proposal, spec.q = list(proposal.tokens), proposal.q

    def _emit_token(self, seq: Sequence, token: int, probs, now: float) -> None:
        seq.tokens.append(token)
        seq.generated += 1
        seq.budget -= 1
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.last_token_at = now
        req = seq.request
        if req.persistent:
            event = SequenceEvent([token], probs=[probs] if probs is not None else [])
            if seq.budget <= 0 or len(seq.tokens) >= self.max_context:
                self.scheduler.pause(seq)
                event.paused = True
            seq.sink(event)
            return
        if token in self.eos_token_ids and not req.sampling.ignore_eos:
            self._finish(seq, FinishReason.EOS, [])
            return
        text = seq.detok.add(token)
        if seq.detok.stopped:
            self._finish(seq, FinishReason.STOP, [token], text)
        elif seq.budget <= 0 or len(seq.tokens) >= self.max_context:
            self._finish(seq, FinishReason.LENGTH, [token], text)
        else:
            seq.sink(SequenceEvent([token], text))

    # -- transitions -----------------------------------------------------------------------
    def _finish(self, seq: Sequence, reason: FinishReason, tokens: list[int], text: str = "",
                error: BaseException | None = None) -> None:
        if seq.status is not Status.FINISHED:
            self.scheduler.finish(seq)
        if seq.spec is not None:
            seq.spec.disable(seq.spec.stats.disabled_reason)
        now = self.clock()
        if seq.admitted_at is None:  # dropped while waiting
            self._dequeued()
        if seq.detok is not None and reason is not FinishReason.CANCELLED:
            text += seq.detok.flush()
        timeline = Timeline(seq.arrival, seq.admitted_at, seq.first_token_at, now, seq.last_token_at,
                            seq.generated - len(seq.request.resume_ids))
        ttft, tpot = timeline.ttft_tpot()
        self.metrics.record_request(now, ttft, tpot, now - seq.arrival, (seq.admitted_at or now) - seq.arrival,
                                    error=error is not None)
        seq.sink(SequenceEvent(tokens, text, finish_reason=reason, error=error,
                               spec=seq.spec.stats if seq.spec is not None else None, timeline=timeline))

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        self._finish(seq, FinishReason.ERROR, [], error=exc)

    def _dequeued(self) -> None:
        with self._queued_lock:
            self._queued -= 1

    def _retry_hint(self) -> float:
        tps = self.metrics.snapshot(self.clock()).requests_per_second
        return max(0.1, min(30.0, self.settings.max_queue / tps)) if tps > 0 else 1.0

    # -- commands ------------------------------------------------------------------------
    def _command(self, fn: Callable[[], None]) -> None:
        self._commands.put(fn)
        self._wake.set()

    def _apply_commands(self) -> None:
        while True:
            try:
                fn = self._commands.get_nowait()
            except queue.Empty:
                return
            fn()

    def _add(self, seq: Sequence) -> None:
        if seq.cancelled:
            self._dequeued()
            seq.status = Status.FINISHED
            seq.sink(SequenceEvent([], finish_reason=FinishReason.CANCELLED))
            return
        self.scheduler.add(seq)

    def _resume(self, seq: Sequence, discard: int, append: list[int], budget: int) -> None:
        if seq.status is not Status.PAUSED:
            seq.sink(SequenceEvent([], finish_reason=FinishReason.ERROR,
                                   error=FailedPrecondition("the sequence is not waiting for a new round")))
            return
        if discard:
            del seq.tokens[len(seq.tokens) - discard:]
            seq.num_cached = min(seq.num_cached, len(seq.tokens))
        seq.tokens.extend(append)
        seq.num_cached = min(seq.num_cached, len(seq.tokens) - 1)  # something must be fed to sample
        seq.budget = max(1, min(budget, self.max_context - len(seq.tokens)))
        self.scheduler.resume(seq)
