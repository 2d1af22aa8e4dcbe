"""The target-model service over a real gRPC channel, on port 0, with a tiny model."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2, model_pb2_grpc, stats_pb2, stats_pb2_grpc
from services.target.config import TargetConfig
from services.target.main import create_server
from tests.conftest import hf_greedy


@pytest.fixture(scope="module")
async def target(tiny_models):
    config = TargetConfig.from_namespace({"model": str(tiny_models.target), "port": 0, "max_batch_size": 8,
                                          "max_queue": 64}, env={})
    app = create_server(config)
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    yield app, model_pb2_grpc.TargetModelStub(channel), channel
    await channel.close()
    await app.stop(0)


def request(ids=None, text=None, **sampling):
    sampling.setdefault("max_new_tokens", 8)
    prompt = gen.Prompt(text=text) if text is not None else gen.Prompt(tokens=gen.TokenIds(ids=ids))
    return gen.GenerateRequest(prompt=prompt, sampling=gen.SamplingParams(**sampling))


async def collect(stub, req, **kw):
    chunks = [c async for c in stub.Generate(req, **kw)]
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks), chunks[-1]


async def test_health_is_serving_after_load(target):
    _, _, channel = target
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "llmesh.v1.TargetModel", "llmesh.v1.Stats"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_greedy_matches_transformers(target, reference_model):
    _, stub, _ = target
    prompt = [5, 17, 42, 99, 3]
    tokens, _, last = await collect(stub, request(prompt, max_new_tokens=12, ignore_eos=True))
    assert tokens == hf_greedy(reference_model, prompt, 12)
    assert last.finish_reason == gen.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == 5 and last.usage.completion_tokens == 12
    assert last.timing.ttft_ms > 0


async def test_text_prompt_streams_text(target, tiny_models):
    _, stub, _ = target
    tokens, text, _ = await collect(stub, request(text="The meaning of", max_new_tokens=10, ignore_eos=True))
    assert len(tokens) == 10
    assert text == tiny_models.tokenizer.decode(tokens)


async def test_seeded_sampling_is_reproducible(target):
    _, stub, _ = target
    req = request([7, 8, 9], max_new_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    a, _, _ = await collect(stub, req)
    b, _, _ = await collect(stub, req)
    other, _, _ = await collect(stub, request([7, 8, 9], max_new_tokens=16, temperature=1.0, seed=99, ignore_eos=True))
    assert a == b
    assert a != other


async def test_concurrent_requests_match_solo_runs(target, reference_model):
    import asyncio

    _, stub, _ = target
    prompts = [[3 + i, 40 + 2 * i, 7] + [i + 1] * (i % 4) for i in range(12)]
    lengths = [4 + (i * 3) % 11 for i in range(12)]
    results = await asyncio.gather(*[collect(stub, request(p, max_new_tokens=n, ignore_eos=True))
                                     for p, n in zip(prompts, lengths)])
    for p, n, (tokens, _, _) in zip(prompts, lengths, results):
        assert tokens == hf_greedy(reference_model, p, n)


@pytest.mark.parametrize("req, code, field", [
    (request(ids=[]), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (request(text=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (gen.GenerateRequest(sampling=gen.SamplingParams(max_new_tokens=4)), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (request([1, 2], max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    (request([1, 2], max_new_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    (request([1, 2], max_new_tokens=10_000), grpc.StatusCode.OUT_OF_RANGE, "max_new_tokens"),
    (request([1, 2], temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (request([1, 2], temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (request([1, 2], top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (request([1, 2], top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (request([1, 999_999]), grpc.StatusCode.OUT_OF_RANGE, "tokens"),
    (request([1] * 300), grpc.StatusCode.OUT_OF_RANGE, "prompt"),
    # Too long for the context through the chat template: named as the field the client sent.
    (gen.GenerateRequest(prompt=gen.Prompt(chat=gen.ChatMessages(messages=[
        gen.ChatMessage(role="user", content="x" * 100_000)])), sampling=gen.SamplingParams(max_new_tokens=2)),
     grpc.StatusCode.OUT_OF_RANGE, "prompt.chat: makes a text"),
    (gen.GenerateRequest(prompt=gen.Prompt(text="hi"), sampling=gen.SamplingParams(max_new_tokens=2), priority=42),
     grpc.StatusCode.INVALID_ARGUMENT, "priority"),
])
async def test_bad_input_gets_a_clear_status_and_service_stays_up(target, req, code, field):
    _, stub, channel = target
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, req)
    assert err.value.code() == code
    assert field in err.value.details()
    assert "Traceback" not in err.value.details()
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("temperature", [1e-39, 1.4e-45, 3.4e38])
async def test_extreme_temperatures_are_served_and_the_service_stays_up(target, reference_model, temperature):
    _, stub, channel = target
    prompt = [5, 17, 42]
    tokens, _, last = await collect(stub, request(prompt, max_new_tokens=6, temperature=temperature, seed=5,
                                                  ignore_eos=True))
    assert last.finish_reason == gen.FINISH_REASON_LENGTH and len(tokens) == 6
    if temperature < 1e-30:
        assert tokens == hf_greedy(reference_model, prompt, 6)
    tokens, _, _ = await collect(stub, request(prompt, max_new_tokens=4, ignore_eos=True))
    assert tokens == hf_greedy(reference_model, prompt, 4)
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_get_info_and_configure(target, tiny_models):
    _, stub, _ = target
    info = await stub.GetInfo(model_pb2.GetInfoRequest())
    assert info.vocab_size == tiny_models.vocab_size and info.max_context == 256
    assert info.role == stats_pb2.ROLE_TARGET and info.num_parameters > 0
    reply = await stub.Configure(model_pb2.ConfigureRequest(max_wait_ms=3.0))
    assert reply.settings.max_wait_ms == 3.0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Configure(model_pb2.ConfigureRequest(max_batch_size=0))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_stats_watch_reports_engine_figures(target):
    _, stub, channel = target
    await collect(stub, request([1, 2, 3], max_new_tokens=5, ignore_eos=True))
    stats = stats_pb2_grpc.StatsStub(channel)
    call = stats.Watch(stats_pb2.WatchStatsRequest(interval_s=0.05))
    report = await call.read()
    call.cancel()
    assert report.role == stats_pb2.ROLE_TARGET
    assert report.tokens_generated_total >= 5 and report.requests_total >= 1
    assert report.max_batch_size == 8 and report.kv_cache_capacity_tokens > 0


def test_the_old_speculation_max_batch_names_still_work_with_a_warning():
    new = TargetConfig.from_args(["--speculative-disable-by-batch-size", "7"], env={})
    assert new.speculative_disable_by_batch_size == 7 and new.speculation_settings().disable_by_batch_size == 7
    with pytest.warns(FutureWarning, match="--speculation-max-batch is deprecated.*--speculative-disable-by"):
        assert TargetConfig.from_args(["--speculation-max-batch", "9"], env={}).speculative_disable_by_batch_size == 9
    with pytest.warns(FutureWarning, match="LLMESH_TARGET_SPECULATION_MAX_BATCH is deprecated"):
        old_env = TargetConfig.from_args([], env={"LLMESH_TARGET_SPECULATION_MAX_BATCH": "3"})
    assert old_env.speculative_disable_by_batch_size == 3
    with pytest.warns(FutureWarning):
        assert TargetConfig.from_namespace({"speculation_max_batch": 5}, env={}).speculative_disable_by_batch_size == 5
    # The new names win over the old ones, flags over variables.
    env = {"LLMESH_TARGET_SPECULATIVE_DISABLE_BY_BATCH_SIZE": "11", "LLMESH_SPECULATION_MAX_BATCH": "12"}
    assert TargetConfig.from_args([], env=env).speculative_disable_by_batch_size == 11
    with pytest.warns(FutureWarning):
        assert TargetConfig.from_args(["--speculation-max-batch", "13"], env=env).speculative_disable_by_batch_size == 13
    assert TargetConfig.from_args([], env={}).speculative_disable_by_batch_size == 0  # the cost model decides


def _broken_schedule(now):
    raise RuntimeError("injected scheduler fault")


async def test_an_engine_fault_fails_the_request_turns_not_serving_and_exits_nonzero(tiny_models):
    """A fault in the engine loop (outside the forward pass): the request in
    flight fails with UNAVAILABLE and a clear message, health turns
    NOT_SERVING, and the service's main path returns exit status 1."""
    import asyncio
    import signal

    from services.serving.app import serve_app
    from tests.conftest import eventually

    config = TargetConfig.from_namespace({"model": str(tiny_models.target), "port": 0, "grace_period_s": 2.0},
                                         env={})
    apps = []
    serving = asyncio.create_task(serve_app(lambda: apps.append(create_server(config)) or apps[-1], "target-model"))
    try:
        (app,) = await eventually(lambda: apps, what="the app")
        channel = grpc.aio.insecure_channel(app.address)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="llmesh.v1.TargetModel"))
        while (await watch.read()).status != health_pb2.HealthCheckResponse.SERVING:
            pass
        call = model_pb2_grpc.TargetModelStub(channel).Generate(request([1, 2, 3], max_new_tokens=240,
                                                                        ignore_eos=True))
        assert (await call.read()).token_ids  # in flight
        app.loaded.engine.scheduler.schedule = _broken_schedule
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "the engine stopped" in err.value.details() and "Traceback" not in err.value.details()
        while (await watch.read()).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            pass
        watch.cancel()
        assert await asyncio.wait_for(serving, 30) == 1 and app.exit_code == 1
        await channel.close()
    finally:
        if not serving.done():
            serving.cancel()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # serve_until_signal's handlers: give them back
            loop.remove_signal_handler(sig)


@pytest.mark.e2e
def test_a_target_process_whose_engine_dies_exits_nonzero(tiny_models):
    """The same fault in a real process: it exits with status 1 for its supervisor."""
    import subprocess
    import sys

    script = ("import sys; from services.engine.scheduler import Scheduler; "
              "from tests.test_target_service import _broken_schedule; Scheduler.schedule = "
              "lambda self, now: _broken_schedule(now); from services.target.main import main; "
              f"sys.exit(main(['--model', {str(tiny_models.target)!r}, '--port', '0', '--grace-period-s', '0', "
              "'--log-level', 'warning']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "the engine stopped" in done.stderr


class _DeadlineOnly:
    """A servicer context whose deadline the server sees, with no client-side
    timer racing it (a real client's own timer usually ends the call first)."""

    def __init__(self, remaining_s: float) -> None:
        self.remaining_s = remaining_s

    def time_remaining(self) -> float:
        return self.remaining_s


async def test_a_request_the_engine_drops_at_its_deadline_ends_with_deadline_exceeded(target):
    """Not with an OK stream whose last chunk says CANCELLED: the client learns its deadline passed."""
    from services.common.errors import DeadlineExceeded

    app, _, _ = target
    req = request([5, 6, 7], max_new_tokens=250, ignore_eos=True)
    with pytest.raises(DeadlineExceeded, match="deadline passed after"):
        async for _ in app.servicer.Generate(req, _DeadlineOnly(0.01)):
            pass
