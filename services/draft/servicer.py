"""DraftModel RPCs: one Propose stream per sequence, batched by the engine."""

from __future__ import annotations

import time

from services.common.errors import InvalidArgument
from services.serving.model_service import configure_changes, model_info, settings_pb
from services.common.stubs import model_pb2, model_pb2_grpc, stats_pb2
from services.speculative.distributions import distribution_pb
from services.draft import codec
from services.engine.async_engine import AsyncEngine
from services.engine.sequence import GenerationRequest


class DraftServicer(model_pb2_grpc.DraftModelServicer):
    def __init__(self, app) -> None:
        self.app = app

    async def Propose(self, request_iterator, context):
        engine = AsyncEngine(self.app.require_loaded().engine)
        session = None
        proposed = 0
        try:
            async for msg in request_iterator:
                gamma = codec.gamma_of(msg)
                started = time.perf_counter()
                if session is None:
                    if not msg.append_tokens:
                        raise InvalidArgument("append_tokens", "the first message must carry the whole context")
                    sampling = codec.draft_sampling(msg.sampling, gamma)
                    want = msg.want_probs or not sampling.greedy
                    session = engine.session(GenerationRequest(
                        prompt_ids=list(msg.append_tokens), sampling=sampling, request_id=msg.request_id,
                        persistent=True, want_probs=want))
                else:
                    if not 0 <= msg.discard <= proposed:
                        raise InvalidArgument("discard", f"must be in [0, {proposed}] (the last proposal), "
                                                         f"got {msg.discard}")
                    session.resume(msg.discard, list(msg.append_tokens), gamma)
                events = await session.next_round()
                if events[-1].error is not None:
                    raise events[-1].error
                tokens = [t for e in events for t in e.token_ids]
                proposed = len(tokens)
                yield model_pb2.ProposeResponse(
                    tokens=tokens, distributions=[distribution_pb(p) for e in events for p in e.probs],
                    compute_ms=(time.perf_counter() - started) * 1000)
        finally:
            if session is not None:
                session.close()

    async def GetInfo(self, request, context):
        return model_info(self.app.require_loaded(), self.app.instance_id, stats_pb2.ROLE_DRAFT, self._settings())

    async def Configure(self, request, context):
        engine = self.app.require_loaded().engine
        changes = configure_changes(request)
        settings = engine.update_settings(**changes) if changes else engine.settings
        return model_pb2.ConfigureResponse(settings=self._settings(settings))

    def _settings(self, settings=None) -> model_pb2.EngineSettings:
        return settings_pb(settings or self.app.require_loaded().engine.settings)
