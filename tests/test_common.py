"""Config parsing and validation, and the one error->status mapping."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import errors
from services.common.config import BaseConfig, ConfigError, field
from services.common.status import RETRY_AFTER_KEY, status_of
from services.common.stubs import generation_pb2 as gen
from services.target.config import TargetConfig


class Mode(enum.Enum):
    FAST = "fast"
    SAFE = "safe"


@dataclass
class DemoConfig(BaseConfig):
    SERVICE = "demo"
    size: int = field(4, "a size")
    ratio: float = field(0.5, "a ratio")
    names: list[str] = field([], "names")
    mode: Mode = field(Mode.SAFE, "a mode")
    flag: bool = field(False, "a flag")


def test_flags_override_service_env_which_overrides_generic_env_and_defaults():
    env = {"LLMESH_SIZE": "7", "LLMESH_DEMO_RATIO": "0.25", "LLMESH_RATIO": "0.9", "LLMESH_DEMO_NAMES": "a, b"}
    c = DemoConfig.from_args(["--size", "9", "--mode", "fast", "--flag", "true"], env=env)
    assert (c.size, c.ratio, c.names, c.mode, c.flag) == (9, 0.25, ["a", "b"], Mode.FAST, True)
    assert DemoConfig.from_args([], env={}).size == 4


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="LLMESH_DEMO_MODE"):
        DemoConfig.from_args([], env={"LLMESH_DEMO_MODE": "turbo"})


def test_bad_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        DemoConfig.from_args(["--size", "many"], env={})
    assert "--size" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, field_name", [
    ({"port": 70000}, "port"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_batch_tokens": 2, "max_batch_size": 4}, "max_batch_tokens"),
    ({"dtype": "int3"}, "dtype"),
    ({"gamma": 20}, "gamma"),
    ({"grace_period_s": -1.0}, "grace_period_s"),
])
def test_target_config_validation_names_the_field(overrides, field_name):
    with pytest.raises(ConfigError, match=field_name):
        TargetConfig.from_namespace({"model": "/nowhere", **overrides}, env={})


@pytest.mark.parametrize("exc, code", [
    (errors.InvalidArgument("x", "bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.OutOfRange("x", "too long"), grpc.StatusCode.OUT_OF_RANGE),
    (errors.ResourceExhausted("full", 2.5), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable("down"), grpc.StatusCode.UNAVAILABLE),
    (errors.NotFound("who"), grpc.StatusCode.NOT_FOUND),
    (errors.DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unauthenticated("token"), grpc.StatusCode.UNAUTHENTICATED),
])
def test_domain_errors_map_to_their_status(exc, code):
    got, message, trailers = status_of(exc)
    assert got == code and message == exc.message
    if isinstance(exc, errors.ResourceExhausted):
        assert dict(trailers)[RETRY_AFTER_KEY] == "2500"


def test_a_method_a_servicer_does_not_implement_is_unimplemented():
    """grpc's generated base methods raise NotImplementedError (grpc.health.v1's List did, as INTERNAL)."""
    code, message, _ = status_of(NotImplementedError("Method not implemented!"))
    assert code == grpc.StatusCode.UNIMPLEMENTED and "not implement" in message


class _GoneContext:
    """A servicer context whose client went away: its writes fail as grpc's do (ExecuteBatchError)."""

    def __init__(self):
        self.aborted = None

    def cancelled(self):
        return True

    def done(self):
        return True

    async def write(self, message):
        raise RuntimeError('Failed "execute_batch": the call is over')

    async def abort(self, code, details=""):
        self.aborted = code


async def test_a_stream_whose_client_went_away_is_no_incident(caplog):
    """A client killed mid-stream: the next write fails. That is not the service's fault: no ERROR (with an
    incident id and a traceback) in its log, no status attempted, through either streaming form."""
    from services.common.status import _wrap_stream, _wrap_writer
    from services.common.telemetry import _written

    async def writer(request, context):  # the router's Generate: writes through context.write itself
        await context.write(gen.GenerateChunk())

    async def generator(request, context):  # every other stream: the interceptor writes what it yields
        yield gen.GenerateChunk()

    context = _GoneContext()
    async for _ in _wrap_writer(writer)(None, context):  # grpc's writer form, as an async generator
        pass
    assert context.aborted is None
    context = _GoneContext()
    await _written(_wrap_stream(generator))(None, context)
    assert context.aborted is None
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_unexpected_errors_become_internal_without_a_traceback():
    code, message, _ = status_of(ZeroDivisionError("secret detail"))
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in message and "Traceback" not in message and "incident" in message


async def test_health_watch_streams_through_the_error_interceptor(tiny_models):
    """grpc's HealthServicer.Watch is a coroutine that writes; the interceptor must not break it."""
    from services.target.main import create_server

    app = create_server(TargetConfig.from_namespace({"model": str(tiny_models.target), "port": 0}, env={}))
    await app.start()
    async with grpc.aio.insecure_channel(app.address) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        first = await asyncio.wait_for(call.read(), 5)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(app.stop(1.0))
        second = await asyncio.wait_for(call.read(), 5)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping


def _bad_utf8_request() -> bytes:
    """A GenerateRequest whose request_id (a proto3 string) is not UTF-8."""
    good = gen.GenerateRequest(request_id="ab", sampling=gen.SamplingParams(max_new_tokens=1)).SerializeToString()
    assert b"ab" in good
    return good.replace(b"ab", b"\xff\xfe")


@pytest.mark.parametrize("method, streaming", [("/llmesh.v1.Router/Generate", True),
                                               ("/llmesh.v1.Router/Complete", False),
                                               ("/llmesh.v1.Router/RegisterInstance", False)])
@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff", _bad_utf8_request()], ids=["not-protobuf", "bad-utf8"])
async def test_undecodable_requests_are_invalid_argument_and_the_service_stays_up(method, streaming, payload):
    from router.config import RouterConfig
    from router.main import create_server as create_router

    app = create_router(RouterConfig.from_namespace({"port": 0, "http_port": 0}, env={}))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            call = (channel.unary_stream if streaming else channel.unary_unary)(method)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                if streaming:
                    async for _ in call(payload):
                        pass
                else:
                    await call(payload)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid protobuf message" in err.value.details()
            assert "Traceback" not in err.value.details()
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await app.stop(0)


@pytest.mark.parametrize("values, q, expected", [
    ([0.026, 0.195], 50, 0.026),          # q*n/100 lands on .5: nearest rank is the lower one
    (list(range(1, 11)), 90, 9),
    (list(range(1, 21)), 95, 19),
    (list(range(1, 21)), 99, 20),
    ([5.0], 50, 5.0),
    ([3, 1, 2], 50, 2),                   # unsorted input
    ([], 99, 0.0),
])
def test_percentiles_are_nearest_rank(values, q, expected):
    from services.common.metrics import Latency, percentile

    assert percentile(values, q) == pytest.approx(expected)
    if values and q in (50, 95, 99):
        assert getattr(Latency.of(values), f"p{q}_ms") == pytest.approx(expected)


@pytest.mark.parametrize("argv, says", [
    (["target", "--model", "/nonexistent/model", "--port", "0"], "no model at /nonexistent/model"),
    (["router", "--port", "{busy}"], "could not bind 127.0.0.1:{busy}"),
    (["draft", "--model", "/nonexistent/model", "--port", "{busy}"], "could not bind 127.0.0.1:{busy}"),
])
def test_a_service_that_cannot_start_says_why_in_one_line_and_exits_1(argv, says):
    """Not a 48-line traceback with the cause buried in it (a bad model path,
    a port in use): one line naming the service and what to fix."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        argv = [a.replace("{busy}", port) for a in argv]
        run = subprocess.run([sys.executable, "-m", "services.cli.main", "serve", *argv], capture_output=True,
                             text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 1
    assert f"llmesh serve {argv[0]}: cannot start: {says.replace('{busy}', port)}" in run.stderr
    assert "Traceback" not in run.stderr and "never awaited" not in run.stderr


def test_a_port_held_by_a_running_grpc_server_is_refused_not_shared():
    """gRPC servers set SO_REUSEPORT by default, so a second llmesh service on
    a port in use used to bind beside the first (the kernel then splits the
    connections); llmesh servers turn it off and refuse instead."""
    import subprocess
    import sys
    from concurrent import futures
    from pathlib import Path

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))  # grpc's defaults: SO_REUSEPORT on
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        run = subprocess.run([sys.executable, "-m", "services.cli.main", "serve", "router", "--port", str(port)],
                             capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    finally:
        server.stop(0)
    assert run.returncode == 1
    assert f"llmesh serve router: cannot start: could not bind 127.0.0.1:{port}" in run.stderr


@pytest.mark.parametrize("argv, says", [
    (["router", "--host", "0.0.0.0", "--port", "0"], "host: '0.0.0.0' is reachable from other machines"),
    (["router", "--port", "0", "--eject-for-s", "-1"], "eject_for_s: must be >= 0"),
    (["target", "--port", "0", "--max-batch-size", "0"], "max_batch_size: must be >= 1"),
    (["monitor", "--port", "0", "--watch-interval-s", "nan"], "watch_interval_s"),
])
def test_a_config_a_service_cannot_use_is_one_line_and_exit_2(argv, says):
    import subprocess
    import sys
    from pathlib import Path

    run = subprocess.run([sys.executable, "-m", "services.cli.main", "serve", *argv], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 2
    assert "error:" in run.stderr and says in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


async def test_wait_event_says_set_or_timed_out_and_is_cancelled_when_its_caller_is():
    from services.common.waits import wait_event

    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 10) is True

    async def loop(ev):  # a control loop that sleeps between ticks
        while True:
            await wait_event(ev, 0.001)

    for _ in range(50):
        task = asyncio.create_task(loop(asyncio.Event()))
        await asyncio.sleep(0.001)  # sleep-ok: lets the cancellation land as the loop's 1 ms timeout fires
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert done and task.cancelled()
    assert not [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "Event.wait"]
