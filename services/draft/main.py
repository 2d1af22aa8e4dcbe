"""The draft-model service's composition root: ``python -m services.draft.main``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from opentelemetry.trace import TracerProvider

from services.common import telemetry
from services.serving.app import ModelApp, run_main
from services.common.stubs import model_pb2_grpc, stats_pb2
from services.draft.config import DraftConfig
from services.draft.servicer import DraftServicer


def create_server(config: DraftConfig, provider: TracerProvider | None = None) -> ModelApp:
    """The service, bound (``app.port``) but not started; ``await app.start()`` loads the model."""
    provider = provider or telemetry.make_tracer_provider("llmesh-draft", config.instance_id)
    return ModelApp(config, stats_pb2.ROLE_DRAFT, "draft", DraftServicer,
                    model_pb2_grpc.add_DraftModelServicer_to_server, provider)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(DraftConfig, create_server, "draft-model", argv)


if __name__ == "__main__":
    sys.exit(main())
