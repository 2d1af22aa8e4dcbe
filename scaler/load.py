"""The scaler's reads of the monitor: a pool's load over the stable and the panic window."""

from __future__ import annotations

import grpc

from scaler import codec
from scaler.policy import PoolMetrics
from services.common.stubs import monitor_pb2, monitor_pb2_grpc


class MonitorLoad:
    """``GetThroughput`` of a pool, turned into the policy's :class:`PoolMetrics`."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float, stable_window_s: float,
                 panic_window_s: float) -> None:
        self._stub = monitor_pb2_grpc.MonitorStub(channel)
        self._timeout_s = timeout_s
        self.stable_window_s = stable_window_s
        self.panic_window_s = panic_window_s

    async def pool(self, pool: str, current: int, targets: set[str]) -> PoolMetrics:
        """The pool's load; ``targets`` are the ids whose per-instance figures measure capacity.
        A monitor that cannot answer gives metrics without windows, and the reason."""
        scope = monitor_pb2.Scope(pool=pool)
        try:
            stable = await self._stub.GetThroughput(
                monitor_pb2.GetThroughputRequest(window_s=self.stable_window_s, scope=scope), timeout=self._timeout_s)
            panic = await self._stub.GetThroughput(
                monitor_pb2.GetThroughputRequest(window_s=self.panic_window_s, scope=scope), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            return PoolMetrics(current, error=f"{exc.code().name}: {exc.details()}")
        if stable.metrics.instances == 0:
            return PoolMetrics(current, error=f"no instance of pool {pool} reported in the last "
                                              f"{self.stable_window_s:g} s")
        return PoolMetrics(current, codec.window_load(stable.metrics),
                           codec.window_load(panic.metrics) if panic.metrics.instances else None,
                           codec.instance_loads(stable, targets))
