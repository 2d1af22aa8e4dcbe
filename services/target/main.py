"""The target-model service's composition root: ``python -m services.target.main``."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from opentelemetry.sdk.trace import TracerProvider

from services.common import telemetry
from services.common.model_app import ModelApp
from services.common.server import serve_until_signal, setup_logging
from services.common.stubs import model_pb2_grpc, stats_pb2
from services.target.config import TargetConfig
from services.target.servicer import TargetServicer


def create_server(config: TargetConfig, provider: TracerProvider | None = None) -> ModelApp:
    """The service, bound (``app.port``) but not started; ``await app.start()`` loads the model."""
    provider = provider or telemetry.make_tracer_provider("llmesh-target", config.instance_id)
    return ModelApp(config, stats_pb2.ROLE_TARGET, "target", lambda app: TargetServicer(app),
                    model_pb2_grpc.add_TargetModelServicer_to_server, provider)


async def serve(config: TargetConfig) -> None:
    app = create_server(config)
    await app.start()
    print(f"target-model serving on {app.address}", flush=True)
    await serve_until_signal(app.server, app.health, config.grace_period_s, on_stop=_async(app.close_engine))


def _async(fn):
    async def run():
        fn()
    return run


def main(argv: Sequence[str] | None = None) -> int:
    config = TargetConfig.from_args(argv, prog="llmesh-target")
    setup_logging(config.log_level)
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
