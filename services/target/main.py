"""The target-model service's composition root: ``python -m services.target.main``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from opentelemetry.trace import TracerProvider

from services.common import telemetry
from services.parallel.build import build_parallel_engine, group_rank, with_rendezvous
from services.parallel.worker import run_worker
from services.serving.app import ModelApp, run_main
from services.common.stubs import model_pb2_grpc, stats_pb2
from services.speculative.speculator import Speculator
from services.target.config import TargetConfig
from services.target.servicer import TargetServicer


def create_server(config: TargetConfig, provider: TracerProvider | None = None) -> ModelApp:
    """The service, bound (``app.port``) but not started; ``await app.start()`` loads the model."""
    provider = provider or telemetry.make_tracer_provider("llmesh-target", config.instance_id)
    spec = config.parallel_spec()
    build = None
    if spec is not None:  # this process is rank 0 of a TP x PP group: it serves, the others compute with it
        def build(speculation):
            return build_parallel_engine(spec, config.engine_settings(), metrics_window_s=config.metrics_window_s,
                                         model_name=config.model_name, speculation=speculation,
                                         prefix_caching=not config.no_prefix_cache)
    return ModelApp(config, stats_pb2.ROLE_TARGET, "target", TargetServicer,
                    model_pb2_grpc.add_TargetModelServicer_to_server, provider,
                    speculation=lambda: Speculator(config.speculation_settings()), build=build)


def worker_rank(config: TargetConfig) -> int | None:
    """Runs this process as a worker rank of its group (torchrun's RANK, or
    ``--node-rank`` > 0) and returns its exit status; None for rank 0 (it serves)."""
    spec = config.parallel_spec()
    if spec is None or (rank := group_rank(spec)) == 0:
        return None
    return run_worker(with_rendezvous(spec), rank)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(TargetConfig, create_server, "target-model", argv, route=worker_rank)


if __name__ == "__main__":
    sys.exit(main())
