"""The target-model service's composition root: ``python -m services.target.main``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from opentelemetry.sdk.trace import TracerProvider

from services.common import telemetry
from services.serving.app import ModelApp, run_main
from services.common.stubs import model_pb2_grpc, stats_pb2
from services.speculative.speculator import Speculator
from services.target.config import TargetConfig
from services.target.servicer import TargetServicer


def create_server(config: TargetConfig, provider: TracerProvider | None = None) -> ModelApp:
    """The service, bound (``app.port``) but not started; ``await app.start()`` loads the model."""
    provider = provider or telemetry.make_tracer_provider("llmesh-target", config.instance_id)
    return ModelApp(config, stats_pb2.ROLE_TARGET, "target", TargetServicer,
                    model_pb2_grpc.add_TargetModelServicer_to_server, provider,
                    speculation=lambda: Speculator(config.speculation_settings()))


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(TargetConfig, create_server, "target-model", argv)


if __name__ == "__main__":
    sys.exit(main())
