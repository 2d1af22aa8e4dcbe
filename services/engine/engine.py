"""The engine: continuous batching around a model runner.

One thread (the engine thread) runs ``step()`` in a loop::

    commands -> [speculation.before_schedule] -> scheduler.schedule -> forward -> advance -> publish

Other threads talk to it only through :meth:`Engine.submit`, :meth:`cancel`,
:meth:`resume` and :meth:`update_settings`, which enqueue commands applied at
the next step boundary, and read it only through :meth:`load`, the immutable
:class:`EngineLoad` the engine thread publishes after each step. So the
scheduler, the KV cache and the metrics have a single owner. Speculative
decoding, when the engine has it, is a strategy called at named points
(:mod:`services.engine.speculation`). If the loop itself fails, every
sequence in flight fails with ``Unavailable`` and the owner is told
(``start(on_fatal=...)``) so that the process can exit for its supervisor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from services.common.errors import (FailedPrecondition, InvalidArgument, LlmeshError, OutOfRange, ResourceExhausted,
                                    Unavailable)
from services.common.metrics import WindowedMetrics
from services.engine import sampler
from services.engine.block_manager import BlockManager
from services.engine.commands import Commands
from services.engine.detokenizer import Detokenizer
from services.engine.kv_events import KVEventLog
from services.engine.load import EngineLoad, LoadPublisher
from services.engine.model_runner import ForwardRow, ModelRunner, RunnerLost
from services.engine.observer import EngineObserver
from services.engine.scheduler import Row, Scheduler, StepPlan
from services.engine.sequence import (FinishReason, GenerationRequest, Sequence, SequenceEvent, Status, Timeline,
                                      TokenLogprob)
from services.engine.settings import EngineSettings
from services.engine.speculation import RoundCounts, Speculation
from services.engine.validation import fit_context, validate

log = logging.getLogger(__name__)


def retry_hint(requests_per_second: float) -> float:
    """Seconds after which a request refused by a full queue may find room: one request's turn at
    the rate requests finished over the metrics window (each one that finishes admits one that
    waits, which frees a place in the queue), in [0.1, 30]; 1.0 while no rate is measured. Not the
    time to drain the whole queue (``max_queue / rate``): 2026-12-02, a burst on an idle server was
    told 30 s, which the openai SDK obeys, for a queue that had room again within a second. Pure."""
    if requests_per_second <= 0:
        return 1.0
    return max(0.1, min(30.0, 1.0 / requests_per_second))


class Engine:
    """Continuous batching of sequences over one model runner and its paged KV cache.

    ``clock`` gives every ``now`` of the engine, scheduler and speculation
    (time.monotonic() seconds unless injected). The windowed metrics in
    :meth:`load` are recomputed at most every ``publish_interval_s`` seconds
    while busy, and as soon as the engine goes idle. ``observer`` sees every
    request's figures as they happen (engine thread); set :attr:`observer`
    before :meth:`start` to give one after construction. ``prefix_caching``:
    reuse the KV cache of prompts' cached prefixes (automatic prefix caching).
    """

    def __init__(self, runner: ModelRunner, tokenizer, settings: EngineSettings,
                 eos_token_ids: list[int] | None = None, metrics_window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, speculation: Speculation | None = None,
                 publish_interval_s: float = 0.5, observer: EngineObserver | None = None,
                 prefix_caching: bool = True) -> None:
        """Raises InvalidArgument for invalid ``settings``."""
        settings.validate()
        self.runner = runner
        self.tokenizer = tokenizer
        self.settings = settings
        self.eos_token_ids = set(eos_token_ids or [])
        self.clock = clock
        self.speculation = speculation
        self.scheduler = Scheduler(settings, BlockManager(runner.cache.num_blocks, runner.cache.block_size,
                                                          enable_prefix_caching=prefix_caching, record_events=True))
        #: The prefix cache's stored/evicted block hashes, for other threads (KV-aware routing).
        self.kv_events = KVEventLog(runner.cache.block_size)
        self.metrics = WindowedMetrics(metrics_window_s, started_at=clock())
        self.observer = observer or EngineObserver()
        self._load = LoadPublisher(self.metrics, publish_interval_s, clock(), runner.cache.capacity_tokens)
        self._commands = Commands()
        self._queued = 0  # submitted but not yet admitted (or dropped)
        self._queued_lock = threading.Lock()  # guards _queued and _failed
        self._failed: Unavailable | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._wake_at: float | None = None
        self._computed = 0
        self._publish(stepped=False)

    @property
    def max_context(self) -> int:
        """Most tokens (prompt + generated) a sequence may hold: the model's
        context, or what the whole KV cache holds if that is less (so a lone
        sequence always fits, and preemption always ends)."""
        return min(self.runner.max_len, self.runner.cache.capacity_tokens)

    @property
    def vocab_size(self) -> int:
        """Token ids are in ``[0, vocab_size)``."""
        return self.runner.vocab_size

    # -- API for other threads (any thread) -------------------------------------------
    def submit(self, request: GenerationRequest, sink: Callable[[SequenceEvent], None]) -> Sequence:
        """Queues a request; ``sink`` receives its events, in order, on the engine thread.
        A request whose sampling has ``fit_context`` gets at most what the
        context leaves after its prompt (its sampling is replaced).

        Raises InvalidArgument/OutOfRange for a request the model cannot serve,
        ResourceExhausted when ``max_queue`` requests are already waiting and
        Unavailable once the engine has stopped on a fault.
        """
        fit_context(request, self.max_context)
        validate(request, self.vocab_size, self.max_context)
        seq = Sequence(request=request, sink=sink, arrival=self.clock())
        if not request.persistent:
            seq.detok = Detokenizer(self.tokenizer, list(request.prompt_ids), request.sampling.stop,
                                    resumed=request.resume_ids)
        seq.base_seed = request.sampling.seed if request.sampling.seed is not None else sampler.random_seed()
        if request.speculation is not None:
            if self.speculation is None:
                raise InvalidArgument("speculation", "this engine does not speculate")
            seq.spec = self.speculation.open(request.speculation,
                                             lambda fn: self._commands.post(lambda: fn(self.clock())))
        with self._queued_lock:  # with _failed: a request is either refused here or failed by _die
            if self._failed is not None:
                raise self._failed
            if self._queued >= self.settings.max_queue:
                self._commands.post(self.metrics.record_rejected)
                raise ResourceExhausted(
                    f"the queue is full ({self.settings.max_queue} requests waiting); retry shortly",
                    retry_after_s=self._retry_hint())
            self._queued += 1
            self._commands.post(lambda: self._add(seq), seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """The sequence leaves the batch at the next step; its slot is freed then."""
        seq.cancelled = True  # the one field another thread writes: a flag the scheduler reads
        self._commands.wake()

    def resume(self, seq: Sequence, discard: int, append: list[int], budget: int) -> None:
        """A paused persistent sequence drops its last ``discard`` tokens, takes
        ``append`` and generates ``budget`` more (tokens; fewer where the
        context ends). Raises OutOfRange for a token id outside the vocabulary
        and Unavailable once the engine has stopped on a fault. A round the
        sequence cannot run fails the sequence (its last event carries the
        error): FailedPrecondition when it is not paused, OutOfRange when
        ``discard`` is more than it holds or the context has no room left."""
        bad = [t for t in append if not 0 <= t < self.vocab_size]
        if bad:
            raise OutOfRange("append_tokens", f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if self._failed is not None:
            raise self._failed
        self._commands.post(lambda: self._resume(seq, discard, append, budget), seq)

    def update_settings(self, **changes) -> EngineSettings:
        """Applies knob changes and returns the new settings: admission
        (``max_queue``, checked by :meth:`submit` on callers' threads) from the
        next submit on, so a caller that sees the answer sees the change; the
        scheduler's knobs at the next step boundary. Raises InvalidArgument for
        invalid values, FailedPrecondition for ``num_slots`` (fixed while the
        engine runs)."""
        candidate = EngineSettings(**{**vars(self.settings), **changes})
        candidate.validate()
        if candidate.num_slots != self.settings.num_slots:
            raise FailedPrecondition("num_slots cannot change while the engine runs")
        with self._queued_lock:  # submit reads max_queue under this lock
            self.settings = candidate  # one reference swap; EngineSettings is not changed in place
        self._commands.post(lambda: setattr(self.scheduler, "settings", candidate))
        return candidate

    def fail(self, exc: BaseException) -> None:
        """Any thread: the engine stops at its next step boundary as if its
        loop had raised ``exc`` (its requests fail with Unavailable, the
        owner's ``on_fatal`` is called). For a runner that lost its ranks between steps."""
        def _raise() -> None:
            raise exc
        self._commands.post(_raise)

    def load(self) -> EngineLoad:
        """The snapshot the engine thread published last (never blocks)."""
        return self._load.latest

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, on_fatal: Callable[[BaseException], None] | None = None) -> None:
        """Runs the engine thread. If its loop raises (a fault outside a batch's
        forward pass), every sequence in flight fails with Unavailable, new
        requests are refused and ``on_fatal(exc)`` is called on the engine thread."""
        self._thread = threading.Thread(target=self._run, args=(on_fatal,), name="llmesh-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the engine thread after its current step (waits up to 10 s)."""
        self._stopping = True
        self._commands.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def run_once(self) -> bool:
        """Applies pending commands and runs one step, on the caller's thread (for
        callers that drive the engine themselves instead of :meth:`start`).
        Exceptions propagate to the caller."""
        self._commands.apply()
        return self.step()

    def _run(self, on_fatal: Callable[[BaseException], None] | None) -> None:
        try:
            while not self._stopping:
                if self.run_once():
                    continue
                now = self.clock()
                wakes = [t for t in (self._wake_at, self._load.refresh_at(now)) if t is not None]
                self._commands.wait(max(0.0, min(wakes) - now) if wakes else None)
        except BaseException as exc:  # noqa: BLE001 - the loop is dead: fail everything, tell the owner
            self._die(exc)
            if on_fatal is not None:
                on_fatal(exc)

    # -- the step (engine thread) --------------------------------------------------------
    def step(self) -> bool:
        """One scheduling iteration: returns False when there was nothing to run."""
        if self.speculation is not None:
            self.speculation.before_schedule(self.scheduler.running, self._demand())
        plan = self.scheduler.schedule(self.clock())
        self._settle(plan)
        if plan.rows:
            logits, busy_s = self._forward(plan.rows)
            self._advance(plan.rows, logits)
            self.metrics.record_step(self.clock(), len(plan.rows), plan.tokens, self._computed, busy_s)
        self._publish(stepped=bool(plan.rows))
        return bool(plan.rows)

    def _publish(self, stepped: bool) -> None:
        s = self.scheduler
        if s.kv.events:
            self.kv_events.append(s.kv.take_events())
        self._load.publish(self.clock(), stepped, s.idle, self._queued, len(s.running), len(s.paused),
                           self.settings.max_batch_size, s.cached_tokens, s.kv)

    def _settle(self, plan: StepPlan) -> None:
        """Bookkeeping of the schedule: admitted ones leave the queue count, dropped ones finish."""
        for seq in plan.admitted:
            self._dequeued()
            if not seq.preemptions:  # its first admission (a preempted one's wait is not a queue time)
                self.metrics.record_admitted(seq.admitted_at, seq.admitted_at - seq.arrival)
        if plan.preempted:
            with self._queued_lock:
                self._queued += len(plan.preempted)
        for seq in plan.dropped:
            self._finish(seq, FinishReason.CANCELLED, [])
        self._wake_at = plan.wake_at

    def _demand(self) -> int:
        """Sequences that want the engine now: running or waiting."""
        return len(self.scheduler.running) + self.scheduler.num_waiting

    def _forward(self, rows: list[Row]) -> tuple[list[torch.Tensor | None], float]:
        """Decode and verify rows run in one forward, prefill chunks in another
        (so decodes are not padded to a prompt's length). Returns each row's
        logits (``[1 + len(row.proposal), vocab]``, None where its forward
        failed: that fails its sequences) and the seconds spent."""
        out: list[torch.Tensor | None] = [None] * len(rows)
        fwd: dict[int, ForwardRow] = {}
        for i, r in enumerate(rows):  # a row that cannot run fails alone, before the batch runs
            # A prompt whose logprobs are asked keeps every position's logits while it is fed.
            keep = r.chunk + len(r.proposal) if self._scores_prompt(r) else 1 + len(r.proposal)
            f = ForwardRow(list(r.seq.block_table), r.start,
                           r.seq.tokens[r.start:r.start + r.chunk] + r.proposal, keep=keep)
            try:
                self.runner.check(f)
            except LlmeshError as exc:
                self._fail(r.seq, exc)
                continue
            fwd[i] = f
        groups = [[i for i in fwd if rows[i].chunk == 1], [i for i in fwd if rows[i].chunk > 1]]
        busy = 0.0
        self._computed = 0
        for group in groups:
            if not group:
                continue
            batch = [fwd[i] for i in group]
            try:
                logits, took = self.runner.timed_forward(batch)
            except RunnerLost:
                raise  # no step can run any more: the loop stops (see _die)
            except Exception as exc:  # noqa: BLE001 - fans out to every sequence in the batch
                log.exception("forward pass failed for %d sequences", len(group))
                for i in group:
                    self._finish(rows[i].seq, FinishReason.ERROR, [], error=exc)
                continue
            busy += took
            for i in group:
                rows[i].forward_s = took
            if self.speculation is not None:
                self.speculation.after_forward([rows[i] for i in group], took, self.clock())
            self._computed += len(group) * max(len(r.tokens) for r in batch)
            for i, lg in zip(group, logits):
                out[i] = lg
        return out, busy

    @staticmethod
    def _scores_prompt(row: Row) -> bool:
        """Whether ``row`` feeds prompt tokens whose logprobs its request asked for."""
        req = row.seq.request
        return req.prompt_logprobs and row.start < len(req.prompt_ids)

    def _score_prompt(self, row: Row, lg: torch.Tensor) -> None:
        """The logprobs of the prompt tokens after ``row``'s first (row i of ``lg``
        predicts token ``start + i + 1``), gathered on the sequence until its
        first event. A prompt position before ``row.start`` that was not fed
        (none is today: every prefill starts at 0) has no logprob."""
        seq, req = row.seq, row.seq.request
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [TokenLogprob(t, None) for t in req.prompt_ids[:row.start + 1]]
        targets = req.prompt_ids[row.start + 1:row.start + row.chunk + 1]  # the next chunk's first one too
        if targets:
            seq.prompt_logprobs += sampler.token_logprobs(lg[:len(targets)], targets, req.logprobs or 0)

    def _advance(self, rows: list[Row], logits: list[torch.Tensor | None]) -> None:
        """Each row's sequence takes its new tokens: sampled, or verified ones.
        What goes wrong for one row (its logits are NaN, its proposal is
        unusable, ...) fails that row's sequence only."""
        now = self.clock()
        produced = 0
        for row, lg in zip(rows, logits):
            seq = row.seq
            if lg is None or seq.status is not Status.RUNNING:
                continue
            try:
                produced += self._advance_row(row, lg, now)
                self.scheduler.after_step(seq)
            except Exception as exc:  # noqa: BLE001 - one sequence's fault stays that sequence's
                self._fail(seq, exc)
        self.metrics.record_tokens(now, produced)
        if produced:
            self.observer.tokens(produced)

    def _advance_row(self, row: Row, lg: torch.Tensor, now: float) -> int:
        """One row's sequence takes its new tokens; returns how many."""
        seq = row.seq
        if self._scores_prompt(row):
            self._score_prompt(row, lg)
        seq.num_cached = row.start + row.chunk
        if not row.completes:
            return 0  # a partial prefill chunk: nothing to sample yet
        if seq.request.scoring:  # the prompt is scored (above): nothing to sample
            self._finish(seq, FinishReason.LENGTH, [])
            return 0
        top = seq.request.logprobs
        if row.proposal:
            tokens = self.speculation.after_verify(seq, row, lg)
            seq.num_cached += len(tokens) - 1  # keys of rejected proposals are overwritten later
            seq.verifying = (len(row.proposal), len(tokens) - 1, len(seq.tokens))
            # Accepted proposals score under the verify pass's target logits, row i for token i.
            lps = sampler.token_logprobs(lg[:len(tokens)], tokens, top) if top is not None else None
            produced = self._emit(seq, tokens, None, now, lps)
            self._settle_round(seq, now)
        else:
            token, probs = sampler.sample(lg[-1], seq.request.sampling, seq.base_seed, len(seq.tokens),
                                          seq.request.want_probs)
            lps = sampler.token_logprobs(lg[-1:], [token], top) if top is not None else None
            produced = self._emit(seq, [token], probs, now, lps)
        if seq.spec is not None and seq.status is Status.RUNNING:
            room = min(seq.budget, self.max_context - len(seq.tokens)) - 1
            self.speculation.after_tokens(seq, now, self._demand(), room)
        return produced

    def _settle_round(self, seq: Sequence, now: float) -> None:
        """The verified round being emitted is done (or the sequence ended in
        it): its figures, counting only emitted tokens, go to the metrics and
        the strategy."""
        if seq.verifying is None:
            return
        gamma, accepted, before = seq.verifying
        seq.verifying = None
        counts = RoundCounts.of(gamma, accepted, len(seq.tokens) - before, seq.status is not Status.RUNNING)
        self.metrics.record_speculation(now, 1, counts.proposed, counts.accepted, counts.emitted)
        self.observer.speculation_round(counts.proposed, counts.accepted)
        self.speculation.after_emit(seq, counts)

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        """``seq`` fails with ``exc`` (a domain error's message reaches its
        client; anything else is logged with its traceback and reaches it as
        an internal error); the engine goes on with the others."""
        if isinstance(exc, LlmeshError):
            log.warning("sequence %s failed: %s", seq.seq_id, exc)
        else:
            log.exception("sequence %s failed", seq.seq_id)
        if seq.status is not Status.FINISHED:
            self._finish(seq, FinishReason.ERROR, [], error=exc)

    def _emit(self, seq: Sequence, tokens: list[int], probs, now: float, logprobs=None) -> int:
        """Appends ``tokens`` one by one until the sequence stops; returns how
        many it took. ``logprobs``: one TokenLogprob per token, or None."""
        taken, previous = 0, seq.last_token_at
        for i, token in enumerate(tokens):
            if seq.status is not Status.RUNNING:
                break
            self._emit_token(seq, token, probs, now, [logprobs[i]] if logprobs is not None else [])
            taken += 1
        if taken and previous is not None:
            self.observer.inter_token(now - previous)
        return taken

    def _emit_token(self, seq: Sequence, token: int, probs, now: float, logprobs=()) -> None:
        seq.tokens.append(token)
        seq.generated += 1
        seq.budget -= 1
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.record_first_token(now, now - seq.arrival)
            self.observer.first_token(now - seq.arrival)
        seq.last_token_at = now
        req = seq.request
        if req.persistent:
            # A persistent sequence (a draft's) hears once per round, when it pauses:
            # one event with the round's tokens, not a cross-thread wake-up per token.
            seq.round_tokens.append(token)
            if probs is not None:
                seq.round_probs.append(probs)
            if seq.budget <= 0 or len(seq.tokens) >= self.max_context:
                self.scheduler.pause(seq)
                seq.sink(SequenceEvent(seq.round_tokens, probs=seq.round_probs, paused=True))
                seq.round_tokens, seq.round_probs = [], []
            return
        if token in self.eos_token_ids and not req.sampling.ignore_eos:
            self._finish(seq, FinishReason.EOS, [])
            return
        text = seq.detok.add(token)
        if seq.detok.stopped:
            self._finish(seq, FinishReason.STOP, [token], text, logprobs=logprobs)
        elif seq.budget <= 0 or len(seq.tokens) >= self.max_context:
            self._finish(seq, FinishReason.LENGTH, [token], text, logprobs=logprobs)
        else:
            seq.sink(SequenceEvent([token], text, logprobs=list(logprobs), prompt_logprobs=self._prompt_lps(seq)))

    # -- transitions (engine thread) ------------------------------------------------------
    @staticmethod
    def _prompt_lps(seq: Sequence) -> list:
        """The prompt logprobs the sequence gathered, once (its first event carries them)."""
        lps, seq.prompt_logprobs = seq.prompt_logprobs, None
        return lps or []

    def _finish(self, seq: Sequence, reason: FinishReason, tokens: list[int], text: str = "",
                error: BaseException | None = None, logprobs=()) -> None:
        if seq.status is not Status.FINISHED:
            self.scheduler.finish(seq)
        now = self.clock()
        self._settle_round(seq, now)  # before the last event carries the statistics
        if seq.spec is not None:
            seq.spec.close()
        if seq.queued:  # dropped while waiting
            seq.queued = False
            self._dequeued()
        if seq.detok is not None and reason is not FinishReason.CANCELLED:
            text += seq.detok.flush()
        timeline = Timeline(seq.arrival, seq.admitted_at, seq.first_token_at, now, seq.last_token_at,
                            seq.generated - len(seq.request.resume_ids))
        _, tpot = timeline.ttft_tpot()
        self.metrics.record_request(now, tpot, now - seq.arrival, error=error is not None)
        self.observer.finished(tpot_s=tpot, e2e_s=now - seq.arrival,
                               queue_s=(seq.admitted_at or now) - seq.arrival,
                               prompt_tokens=len(seq.request.prompt_ids), generation_tokens=timeline.new_tokens,
                               reason=reason.value, speculation=seq.spec.stats if seq.spec is not None else None)
        seq.sink(SequenceEvent(tokens, text, finish_reason=reason, error=error,
                               spec=seq.spec.stats if seq.spec is not None else None, timeline=timeline,
                               logprobs=list(logprobs), prompt_logprobs=self._prompt_lps(seq)))

    def _dequeued(self) -> None:
        with self._queued_lock:
            self._queued -= 1

    def _retry_hint(self) -> float:
        return retry_hint(self._load.latest.metrics.requests_per_second)

    def _die(self, exc: BaseException) -> None:
        """The loop failed: every sequence in flight (waiting, running, paused, or
        still in the command queue) gets an Unavailable error event; later
        requests are refused. Touches as little engine state as possible."""
        log.critical("the engine stopped on an unexpected error", exc_info=exc)
        error = Unavailable(f"the engine stopped ({type(exc).__name__}); the service is restarting, retry")
        with self._queued_lock:
            self._failed = error
        doomed = self.scheduler.in_flight() + self._commands.drain()
        for seq in [s for s in dict.fromkeys(doomed) if s.status is not Status.FINISHED]:
            seq.status = Status.FINISHED
            try:
                seq.spec is not None and seq.spec.close()
                seq.sink(SequenceEvent([], finish_reason=FinishReason.ERROR, error=error))
            except Exception:  # noqa: BLE001 - one broken sink must not keep the others from hearing
                log.exception("could not fail sequence %s", seq.seq_id)

    # -- commands (engine thread) ---------------------------------------------------------
    def _add(self, seq: Sequence) -> None:
        if seq.cancelled:
            self._dequeued()
            seq.status = Status.FINISHED
            seq.sink(SequenceEvent([], finish_reason=FinishReason.CANCELLED))
            return
        self.scheduler.add(seq)

    def _resume(self, seq: Sequence, discard: int, append: list[int], budget: int) -> None:
        error = None
        if seq.status is not Status.PAUSED:
            error = FailedPrecondition("the sequence is not waiting for a new round")
        elif not 0 <= discard < len(seq.tokens):
            error = OutOfRange("discard", f"must be in [0, {len(seq.tokens)}) (tokens the sequence holds), "
                                          f"got {discard}")
        elif (held := len(seq.tokens) - discard + len(append)) >= self.max_context:
            error = OutOfRange("append_tokens", f"the sequence would hold {held} tokens and the model's context is "
                                                f"{self.max_context}: no room to generate")
        if error is None:
            seq.next_round(discard, append, budget, self.max_context)
            self.scheduler.kv.trim(seq)  # positions past the kept tokens are rewritten
            self.scheduler.resume(seq)
        elif seq.status is Status.FINISHED:
            seq.sink(SequenceEvent([], finish_reason=FinishReason.ERROR, error=error))
        else:  # it cannot run: it ends here (and frees its slot), before any forward sees it
            self._finish(seq, FinishReason.ERROR, [], error=error)
