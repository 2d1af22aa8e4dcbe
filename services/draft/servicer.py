"""DraftModel RPCs: one Propose stream per sequence, batched by the engine."""

from __future__ import annotations

import time

from services.common.stubs import model_pb2, model_pb2_grpc, stats_pb2
from services.draft import codec
from services.draft.proposer import DraftProposer, NgramProposer
from services.engine.async_engine import AsyncEngine
from services.serving.model_service import configure_changes, model_info, settings_pb


class DraftServicer(model_pb2_grpc.DraftModelServicer):
    """DraftModel RPCs; the sync protocol is DraftProposer's, this only translates."""

    def __init__(self, app) -> None:
        self.app = app

    async def Propose(self, request_iterator, context):
        engine = self.app.require_loaded().engine
        proposer = None
        try:
            async for msg in request_iterator:
                started = time.perf_counter()
                start = None
                if proposer is None:  # the first message says how to propose
                    start = codec.start_of(msg)
                    proposer = NgramProposer(engine.vocab_size) if start.ngram else DraftProposer(AsyncEngine(engine))
                tokens, probs = await proposer.propose(codec.round_of(msg), start)
                yield codec.response_pb(tokens, probs, (time.perf_counter() - started) * 1000)
        finally:
            if proposer is not None:
                proposer.close()

    async def GetInfo(self, request, context):
        return model_info(self.app.require_loaded(), self.app.instance_id, stats_pb2.ROLE_DRAFT, self._settings())

    async def Configure(self, request, context):
        engine = self.app.require_loaded().engine
        changes = configure_changes(request, speculates=False)
        settings = engine.update_settings(**changes) if changes else engine.settings
        return model_pb2.ConfigureResponse(settings=self._settings(settings))

    def _settings(self, settings=None) -> model_pb2.EngineSettings:
        return settings_pb(settings or self.app.require_loaded().engine.settings)
