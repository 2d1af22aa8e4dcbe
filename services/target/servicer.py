"""TargetModel RPCs: decode the request, run it in the engine, encode events."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

from services.serving import generation_codec as codec
from services.common.errors import DeadlineExceeded, InvalidArgument
from services.common.telemetry import record_phases
from services.common.validation import check_address, check_gamma_range
from services.serving.model_service import SPECULATION_FIELDS, configure_changes, model_info, settings_pb
from services.serving.token_bytes import token_bytes
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2, model_pb2_grpc, stats_pb2
from services.engine.async_engine import AsyncEngine
from services.engine.sampler import random_seed
from services.engine.sequence import FinishReason
from services.speculative.ngram import LocalNgramProposer
from services.speculative.remote import ProposerClient
from services.speculative.state import SpecStats, SpeculationRequest
from services.target.config import SpeculativeMethod

#: SpecStats.method -> SpeculationStats.method.
METHODS = {"draft_model": gen.SPECULATION_METHOD_DRAFT_MODEL, "ngram": gen.SPECULATION_METHOD_NGRAM}


class TargetServicer(model_pb2_grpc.TargetModelServicer):
    """TargetModel RPCs (event loop); the engine and its Speculator do the work."""

    def __init__(self, app) -> None:
        self.app = app
        self.config = app.config
        self.proposers = ProposerClient(app.provider, app.config.channels())
        self.tracer = app.provider.get_tracer("llmesh.target")

    @property
    def instance_id(self) -> str:
        return self.app.instance_id

    async def Generate(self, request, context):
        loaded = self.app.require_loaded()
        engine = AsyncEngine(loaded.engine)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        codec.check_request(request)
        req = codec.request_of(request, await self.app.prompt_ids(request.prompt), deadline)
        request_id = request.request_id or uuid.uuid4().hex
        # Scoring (max_new_tokens 0): only the prompt's prefill runs, so nothing to speculate.
        req.speculation = (None if req.scoring else
                           self._speculation(request, req, request_id, loaded.engine.vocab_size))
        usage = gen.Usage(prompt_tokens=len(req.prompt_ids) + len(req.resume_ids),
                          completion_tokens=len(req.resume_ids))
        if (request.sampling.fit_context and req.resume_ids
                and len(req.prompt_ids) + len(req.resume_ids) == loaded.engine.max_context):
            # The stream this resumes (the router's, after a break) had filled the context: it ended there.
            yield gen.GenerateChunk(request_id=request_id, finish_reason=gen.FINISH_REASON_LENGTH, usage=usage,
                                    instance_id=self.instance_id)
            return
        # echo_prompt: the prompt's text leads the first chunk's text.
        echo = loaded.engine.tokenizer.decode(req.prompt_ids) if request.echo_prompt else ""
        tokenizer = loaded.engine.tokenizer

        def token_text(ids: list[int]) -> list[tuple[str, bytes]]:
            texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                           clean_up_tokenization_spaces=False)
            return list(zip(texts, token_bytes(tokenizer, ids, texts)))

        async for event in engine.generate(req):
            usage.completion_tokens += len(event.token_ids)
            chunk = gen.GenerateChunk(request_id=request_id, token_ids=event.token_ids, text=echo + event.text,
                                      usage=usage, instance_id=self.instance_id)
            echo = ""
            if event.logprobs or event.prompt_logprobs:
                chunk.logprobs.extend(codec.logprobs_pb(event.logprobs, token_text))
                chunk.prompt_logprobs.extend(codec.logprobs_pb(event.prompt_logprobs, token_text))
            if event.finish_reason is not None:
                if event.error is not None:
                    raise event.error
                if (event.finish_reason is FinishReason.CANCELLED and deadline is not None
                        and time.monotonic() >= deadline):
                    # The engine dropped it at its deadline: the client's deadline status, not an OK
                    # stream that merely stops (which the client's own timer may not have fired for yet).
                    raise DeadlineExceeded(f"the request's deadline passed after {usage.completion_tokens} "
                                           "generated tokens")
                chunk.finish_reason = codec.FINISH_REASONS[event.finish_reason]
                if event.spec is not None:
                    chunk.speculation.CopyFrom(self._spec_pb(event.spec))
                chunk.timing.CopyFrom(self._timing(event.timeline))
                self._trace(event, len(req.prompt_ids), usage.completion_tokens)
            yield chunk

    def _speculation(self, request, req, request_id: str, vocab_size: int) -> SpeculationRequest | None:
        """The request's proposer when it speculates: its own setting, else
        yes when it names a method or a gamma (it asked how to speculate),
        else the default. A request that does not name its method proposes as
        ``--speculative-method`` says; with the draft model, it falls back to
        n-gram lookup in this process when no draft serves it or its acceptance
        does not pay (:mod:`services.speculative.fallback`). A request that
        names the draft model gets exactly that (no draft: no speculation); one
        that names ngram looks up in this process when it has no draft address.
        An unseeded request gets its random seed here, so that the draft draws
        with the same noise as the target."""
        s = request.speculation
        if s.HasField("enabled"):
            enabled = s.enabled
        else:
            enabled = (s.method != gen.SPECULATION_METHOD_UNSPECIFIED or s.HasField("gamma")
                       or self.config.speculation_default)
        if not enabled:
            return None
        c = self.config
        if s.method not in gen.SpeculationMethod.values():
            raise InvalidArgument("speculation.method", f"unknown method {s.method}; use DRAFT_MODEL or NGRAM")
        fallback = None
        if s.method == gen.SPECULATION_METHOD_UNSPECIFIED:
            ngram = c.speculative_method is SpeculativeMethod.NGRAM
            fallback = None if ngram else LocalNgramProposer
        else:
            ngram = s.method == gen.SPECULATION_METHOD_NGRAM
        address = request.draft_address or c.draft_address
        if not address and not ngram and fallback is None:
            return None
        if req.sampling.seed is None:
            req.sampling = replace(req.sampling, seed=random_seed())
        if address:
            proposer = self.proposers.proposer(address, request_id, req.sampling, vocab_size, ngram=ngram)
        else:
            proposer = LocalNgramProposer() if ngram else None  # None: the fallback from the first round
        if s.HasField("gamma"):
            return SpeculationRequest(proposer, s.gamma, s.gamma, s.gamma, fixed=True, fallback=fallback)
        return SpeculationRequest(proposer, c.gamma, c.gamma_min, c.gamma_max, fallback=fallback)

    @staticmethod
    def _spec_pb(stats: SpecStats) -> gen.SpeculationStats:
        return gen.SpeculationStats(rounds=stats.rounds, proposed_tokens=stats.proposed,
                                    accepted_tokens=stats.accepted,
                                    accepted_per_position=stats.accepted_per_position,
                                    mean_accepted_length=stats.mean_accepted_length,
                                    disabled_reason=stats.disabled_reason, draft_wait_ms=stats.draft_wait_ms,
                                    draft_compute_ms=stats.draft_compute_ms, verify_ms=stats.verify_ms,
                                    draft_timeouts=stats.draft_timeouts,
                                    rounds_dropped_by_batch_size=stats.dropped_by_batch_size,
                                    method=METHODS[stats.method], fallback_reason=stats.fallback_reason,
                                    steps_not_speculated=stats.steps_not_speculated,
                                    not_speculated_reason=stats.not_speculated_reason)

    @staticmethod
    def _timing(t) -> gen.Timing:
        ms = lambda a, b: (b - a) * 1000.0 if a is not None and b is not None else 0.0  # noqa: E731
        ttft, tpot = t.ttft_tpot()
        return gen.Timing(queue_ms=ms(t.arrival, t.admitted), ttft_ms=(ttft or 0.0) * 1000.0,
                          tpot_ms=(tpot or 0.0) * 1000.0, elapsed_ms=ms(t.arrival, t.finished))

    def _trace(self, event, prompt_tokens: int, completion_tokens: int) -> None:
        """Spans for the engine's phases of this request, under the call's span."""
        t = event.timeline
        attributes = {"llmesh.prompt_tokens": prompt_tokens, "llmesh.completion_tokens": completion_tokens,
                      "llmesh.finish_reason": event.finish_reason.value}
        if event.spec is not None:
            attributes.update({"llmesh.spec.rounds": event.spec.rounds, "llmesh.spec.proposed": event.spec.proposed,
                               "llmesh.spec.accepted": event.spec.accepted})
        record_phases(self.tracer, [("llmesh.queue", t.arrival, t.admitted),
                                    ("llmesh.prefill", t.admitted, t.first_token),
                                    ("llmesh.decode", t.first_token, t.finished)], attributes)

    async def GetInfo(self, request, context):
        return model_info(self.app.require_loaded(), self.instance_id, stats_pb2.ROLE_TARGET, self._settings())

    async def Configure(self, request, context):
        changes = configure_changes(request)
        spec = {name: getattr(request, name) for name in SPECULATION_FIELDS if request.HasField(name)}
        g = {k: spec.get(k, getattr(self.config, k)) for k in ("gamma_min", "gamma", "gamma_max")}
        check_gamma_range(g["gamma_min"], g["gamma"], g["gamma_max"])
        if spec.get("draft_address"):  # "" clears the default draft
            check_address("draft_address", spec["draft_address"])
        engine = self.app.require_loaded().engine
        settings = engine.update_settings(**changes) if changes else engine.settings
        for name, value in spec.items():
            setattr(self.config, name, value)
        return model_pb2.ConfigureResponse(settings=self._settings(settings))

    def _settings(self, settings=None) -> model_pb2.EngineSettings:
        c = self.config
        return settings_pb(settings or self.app.require_loaded().engine.settings, speculation_default=c.speculation_default, gamma=c.gamma,
                           gamma_min=c.gamma_min, gamma_max=c.gamma_max, draft_address=c.draft_address)
