"""End to end: `llmesh up --tls` makes its certificates, starts the five
services on TLS (mutual between them) and serves clients that trust its CA."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from services.common.stubs import model_pb2, model_pb2_grpc, router_pb2_grpc
from tests.e2e_helpers import REPO, Suite, alive, greedy, make_home, tokens_of, wait_until_routable

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def home(tiny_models, tmp_path_factory) -> Path:
    return make_home(tiny_models, tmp_path_factory, "llmesh-tls-home")


def test_up_with_tls_serves_over_tls_only_and_stops_cleanly(home):
    suite = Suite.start(home, "--tls")
    try:
        certs = home / "certs"
        assert stat.S_IMODE((certs / "target.key").stat().st_mode) == 0o600
        assert any("TLS, mutual between services" in line for line in suite.output)
        ca = (certs / "ca.crt").read_bytes()
        cli = [(certs / f"cli.{ext}").read_bytes() for ext in ("key", "crt")]
        with grpc.secure_channel(suite.addresses["target"], grpc.ssl_channel_credentials(ca, *cli)) as channel:
            direct = tokens_of(model_pb2_grpc.TargetModelStub(channel), greedy(speculate=False))
        with grpc.secure_channel(suite.addresses["router"], grpc.ssl_channel_credentials(ca)) as channel:
            router = router_pb2_grpc.RouterStub(channel)
            wait_until_routable(router)
            assert tokens_of(router, greedy(speculate=True)) == direct
        for name in ("router", "target"):
            with grpc.insecure_channel(suite.addresses[name]) as channel:
                with pytest.raises(grpc.RpcError) as err:
                    model_pb2_grpc.TargetModelStub(channel).GetInfo(model_pb2.GetInfoRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, name
        env = {**os.environ, "LLMESH_HOME": str(home)}
        done = subprocess.run([sys.executable, "-m", "services.cli.main", "generate", "hello", "--max-tokens", "3",
                               "--ignore-eos", "--router", suite.addresses["router"], "--tls"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "3 tokens" in done.stderr
        assert suite.terminate() == 0
        assert [name for name, pid in suite.pids.items() if alive(pid)] == []
    finally:
        suite.cleanup()
