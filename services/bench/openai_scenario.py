"""`llmesh bench --scenario openai`: the HTTP front door, measured by a peer
harness and against ``Router.Generate``.

One target and one router serving HTTP (processes started here, as the
router scenario does):

- **the front door's cost**: the same greedy streams through HTTP
  (``/v1/completions``, ``stream: true``, SSE read to ``[DONE]``) and through
  ``Router.Generate``: latency at concurrency 1 (the two interleaved, so
  drift hits them alike; ``http_added_latency_p50_ms``) and tokens/s at
  concurrency 32 in alternating runs (``http_throughput_ratio``).
- **a peer harness**: GuideLLM (``guidellm benchmark``, from PyPI) against
  the front door at a sweep of constant request rates, its TTFT, ITL, output
  tokens/s and request throughput, next to llmesh's own open-loop load
  generator at the same rates and token counts through ``Router.Generate``.
- **lm-evaluation-harness**: ``lm_eval --model local-completions`` (echoed
  prompt logprobs: a log-likelihood task) on a multiple-choice task written
  here as YAML over local JSON, its accuracy and wall time.

The harnesses run as their own processes (``guidellm`` and ``lm_eval`` next
to this Python: ``pip install 'llmesh[bench]'``); a missing one is reported,
not faked. Importing this module registers the scenario.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc
import httpx2 as httpx

from services.bench import local_suite
from services.bench.loadgen import alternating_runs, greedy_request, interleaved_latency, open_loop
from services.bench.router_scenario import STREAM_CONCURRENCY, _ms, running, target_threads
from services.bench.scenarios import ALL_RUNS, SCENARIOS, BenchOptions, median
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import router_pb2_grpc
from services.models.corpus import heldout_prompts

#: Request rates (requests/s) of the sweep, and requests per rate.
RATES = (1.0, 2.0, 4.0)
REQUESTS_PER_RATE = 24
#: Synthetic load of the sweep: prompt and output tokens per request.
PROMPT_TOKENS, OUTPUT_TOKENS = 64, 32


class HttpStub:
    """``Generate`` over the HTTP front door, as :mod:`services.bench.loadgen`
    calls it: each SSE event with text is one chunk of one token (greedy,
    no speculation: the router streams a chunk per token), corrected to the
    usage the last event reports. ``client``: an ``aiohttp.ClientSession``
    (the lean client the front door's cost is measured with) or an
    ``httpx.AsyncClient`` (the openai SDK's client, reported beside it)."""

    def __init__(self, client, url: str, model: str) -> None:
        self.client, self.url, self.model = client, url, model

    async def _lines(self, body: dict):
        """The reply's lines (bytes), raising for a status other than 200."""
        url = f"{self.url}/v1/completions"
        if isinstance(self.client, httpx.AsyncClient):
            async with self.client.stream("POST", url, json=body) as reply:
                if reply.status_code != 200:
                    raise _http_error(reply.status_code, await reply.aread())
                async for line in reply.aiter_lines():
                    yield line.encode()
            return
        async with self.client.post(url, json=body) as reply:
            if reply.status != 200:
                raise _http_error(reply.status, await reply.read())
            async for line in reply.content:
                yield line

    async def Generate(self, request: gen.GenerateRequest, timeout=None):
        body = {"model": self.model, "prompt": request.prompt.text, "max_tokens": request.sampling.max_new_tokens,
                "temperature": 0, "ignore_eos": request.sampling.ignore_eos, "stream": True,
                "stream_options": {"include_usage": True}}
        seen = 0
        async for line in self._lines(body):
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                seen += 1
                finish = event["choices"][0].get("finish_reason")
                yield gen.GenerateChunk(token_ids=[0], finish_reason=gen.FINISH_REASON_LENGTH if finish else 0)
            elif event.get("usage") and event["usage"]["completion_tokens"] > seen:
                yield gen.GenerateChunk(token_ids=[0] * (event["usage"]["completion_tokens"] - seen))


def _http_error(status: int, body: bytes) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNKNOWN, None, None, f"HTTP {status}: {body[:200]!r}")


def _lean_client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300),
                                 connector=aiohttp.TCPConnector(limit=256))


def _sdk_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))


# -- the front door's cost ----------------------------------------------------------
async def _cost(router: str, url: str, model: str, prompts: list[str], n: int, new_tokens: int,
                stream_new_tokens: int, total: int, repeats: int, progress: bool) -> dict:
    """The front door's cost: HTTP (the lean aiohttp client; the openai SDK's
    httpx beside it, latency only) vs ``Router.Generate``, same requests."""
    async with grpc.aio.insecure_channel(router) as channel, _lean_client() as lean, _sdk_client() as sdk:
        stubs = {"grpc": router_pb2_grpc.RouterStub(channel), "http": HttpStub(lean, url, model)}

        def stream(stub):
            async def call(req) -> int:
                return sum([len(c.token_ids) async for c in stub.Generate(req)])
            return call

        kinds = {k: stream(s) for k, s in {**stubs, "http_httpx": HttpStub(sdk, url, model)}.items()}
        times = await interleaved_latency(
            kinds, lambda i: greedy_request(prompts[i % len(prompts)], new_tokens, speculate=False), n)
        make = lambda i: greedy_request(prompts[i % len(prompts)], stream_new_tokens, speculate=False)  # noqa: E731
        runs = await alternating_runs(stubs, make, STREAM_CONCURRENCY, total, repeats, progress)
    tps = {k: [r.tokens_per_s for r in v] for k, v in runs.items()}
    ratio = median(tps["http"]) / median(tps["grpc"]) if median(tps["grpc"]) else None
    paired = [h - g for h, g in zip(times["http"], times["grpc"])]
    return {
        "latency_requests": n, "new_tokens": new_tokens, "http_client": f"aiohttp {aiohttp.__version__}",
        "grpc_p50_ms": round(_ms(times["grpc"], 50), 3), "http_p50_ms": round(_ms(times["http"], 50), 3),
        "grpc_p99_ms": round(_ms(times["grpc"], 99), 3), "http_p99_ms": round(_ms(times["http"], 99), 3),
        "http_added_latency_p50_ms": round(_ms(times["http"], 50) - _ms(times["grpc"], 50), 3),
        "http_added_latency_paired_p50_ms": round(_ms(paired, 50), 3),
        "http_httpx_p50_ms": round(_ms(times["http_httpx"], 50), 3),
        "http_httpx_added_latency_p50_ms": round(_ms(times["http_httpx"], 50) - _ms(times["grpc"], 50), 3),
        "stream_concurrency": STREAM_CONCURRENCY, "stream_new_tokens": stream_new_tokens,
        "grpc_tps_runs": [round(x, 1) for x in tps["grpc"]], "http_tps_runs": [round(x, 1) for x in tps["http"]],
        "http_throughput_ratio": round(ratio, 4) if ratio is not None else None,
        "errors": sum(r.errors for v in runs.values() for r in v),
    }


# -- the peer harness ---------------------------------------------------------------
def _tool(name: str) -> str | None:
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else None


def _guidellm(url: str, model: str, model_dir: Path, out_dir: Path) -> dict:
    """GuideLLM at each rate of the sweep; its own per-rate figures."""
    exe = _tool("guidellm")
    if exe is None:
        return {"error": "guidellm is not installed next to this Python (pip install 'llmesh[bench]')"}
    out = out_dir / "guidellm.json"
    command = [exe, "run", "--backend", f"kind=openai_http,target={url},model={model},request_format=/v1/completions",
               "--profile", f"kind=constant,rate={RATES[0]}", "--override", "profile.rate",
               ",".join(str(r) for r in RATES), "--constraint", f"kind=max_requests,count={REQUESTS_PER_RATE}",
               "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
               "--tokenizer", f"kind=huggingface_auto,model={model_dir}", "--output", f"kind=json,path={out}",
               "--disable-progress"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    result = {"command": " ".join(["guidellm", *command[1:]]), "wall_s": round(time.perf_counter() - started, 1),
              "returncode": done.returncode}
    if done.returncode != 0 or not out.exists():
        result["error"] = (done.stderr or done.stdout)[-1500:]
        return result
    result["rates"] = _guidellm_summary(json.loads(out.read_text()))
    return result


def _stat(metrics: dict, name: str, field: str = "median") -> float | None:
    """A figure of GuideLLM's report: ``metrics[name]["successful"][field]``."""
    try:
        value = metrics[name]["successful"][field]
    except (KeyError, TypeError):
        return None
    return round(value, 3) if isinstance(value, (int, float)) else None


def _guidellm_summary(report: dict) -> list[dict]:
    rows = []
    for bench in report.get("benchmarks", []):
        m = bench.get("metrics", {})
        strategy = bench.get("config", {}).get("strategy", {})
        totals = m.get("request_totals", {})
        rows.append({
            "rate": strategy.get("rate"),
            "ttft_p50_ms": _stat(m, "time_to_first_token_ms"),
            "itl_p50_ms": _stat(m, "inter_token_latency_ms"),
            "output_tokens_per_s": _stat(m, "output_tokens_per_second", "mean"),
            "requests_per_s": _stat(m, "requests_per_second", "mean"),
            "successful": totals.get("successful"), "errored": totals.get("errored"),
        })
    return rows


async def _own_sweep(router: str, prompts: list[str], progress: bool) -> list[dict]:
    """llmesh's own open-loop generator at the sweep's rates through Router.Generate."""
    rows = []
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for rate in RATES:
            make = lambda i: greedy_request(prompts[i % len(prompts)], OUTPUT_TOKENS, speculate=False)  # noqa: E731
            run = await open_loop(stub, make, rate, REQUESTS_PER_RATE, label=f"llmesh rate {rate}/s",
                                  progress=progress)
            rows.append({"rate": rate, "ttft_p50_ms": round(run.pct("ttft_s", 50), 3),
                         "itl_p50_ms": round(run.pct("tpot_s", 50), 3),
                         "output_tokens_per_s": round(run.tokens_per_s, 1),
                         "requests_per_s": round(len(run.results) / run.wall_s, 3) if run.wall_s else None,
                         "errors": run.errors})
    return rows


# -- lm-evaluation-harness ------------------------------------------------------------
TASK_YAML = """task: llmesh_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def _lm_eval(url: str, model: str, model_dir: Path, out_dir: Path, prompts: list[str]) -> dict:
    """lm_eval's local-completions on a multiple-choice task over local JSON:
    which of four continuations follows each held-out sentence's first half."""
    exe = _tool("lm_eval")
    if exe is None:
        return {"error": "lm_eval is not installed next to this Python (pip install 'llmesh[bench]')"}
    task_dir = out_dir / "lm_eval_task"
    task_dir.mkdir(parents=True, exist_ok=True)
    docs = []
    halves = [(p[:len(p) // 2], p[len(p) // 2:]) for p in prompts[:24]]
    for i, (head, tail) in enumerate(halves):
        choices = [tail, *(halves[(i + k) % len(halves)][1] for k in (5, 11, 17))]
        docs.append({"question": head, "choices": choices, "answer": 0})
    data = task_dir / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (task_dir / "llmesh_local_choice.yaml").write_text(TASK_YAML.format(data=data))
    args = (f"model={model},base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={model_dir},"
            "num_concurrent=4,max_retries=1,tokenized_requests=True")
    command = [exe, "--model", "local-completions", "--model_args", args, "--tasks", "llmesh_local_choice",
               "--include_path", str(task_dir), "--output_path", str(out_dir / "lm_eval")]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    result = {"command": " ".join(["lm_eval", *command[1:]]), "docs": len(docs),
              "wall_s": round(time.perf_counter() - started, 1), "returncode": done.returncode}
    found = sorted((out_dir / "lm_eval").rglob("results*.json"))
    if done.returncode != 0 or not found:
        result["error"] = (done.stderr or done.stdout)[-1500:]
        return result
    scores = json.loads(found[-1].read_text())["results"]["llmesh_local_choice"]
    result.update({k.split(",")[0]: round(v, 4) for k, v in scores.items() if isinstance(v, (int, float))})
    return result


# -- the scenario ---------------------------------------------------------------------
def openai_bench(opts: BenchOptions, new_tokens: int = 8, stream_new_tokens: int = 64,
                 latency_requests: int = 50) -> dict:
    """The front door's cost (HTTP vs Router.Generate), GuideLLM's sweep next to
    llmesh's own, and an lm-evaluation-harness run."""
    prompts = heldout_prompts(256, seed=0)
    model_dir = opts.model_dir(opts.model)
    threads = target_threads(opts)
    http_port = local_suite.free_port()
    target = local_suite.target_spec(model_dir, threads, max_batch_size=STREAM_CONCURRENCY)
    router = local_suite.router_spec([target.address], flags=("--http-port", str(http_port)))
    url = f"http://127.0.0.1:{http_port}"
    out_dir = Path(tempfile.mkdtemp(prefix="llmesh-bench-openai-"))
    with running([target, router]):
        model = model_dir.name
        cost = asyncio.run(_cost(router.address, url, model, prompts, latency_requests * opts.repeats, new_tokens,
                                 stream_new_tokens, 2 * STREAM_CONCURRENCY, opts.repeats, opts.progress))
        if opts.harnesses:
            peer = _guidellm(url, model, model_dir, out_dir)
            own = asyncio.run(_own_sweep(router.address, prompts, opts.progress))
            lm_eval = _lm_eval(url, model, model_dir, out_dir, prompts)
        else:
            peer = own = lm_eval = {"skipped": "--no-harnesses"}
    result = {"scenario": "openai", "model": opts.model, "repeats": opts.repeats, "target_threads": threads,
              **cost, "sweep": {"rates": list(RATES), "requests_per_rate": REQUESTS_PER_RATE,
                                "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS,
                                "guidellm": peer, "llmesh_grpc": own},
              "lm_eval": lm_eval}
    ratio = result["http_throughput_ratio"]
    result["goals_met"] = {
        "http_added_latency_p50_ms<=1": result["http_added_latency_p50_ms"] <= 1.0,
        "http_throughput_ratio>=0.95": ratio is not None and ratio >= 0.95,
        "errors==0": result["errors"] == 0,
    }
    return result


SCENARIOS["openai"] = openai_bench
if ("openai", "target") not in ALL_RUNS:
    ALL_RUNS.append(("openai", "target"))
