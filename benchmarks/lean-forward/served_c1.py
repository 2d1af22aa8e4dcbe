"""Served target-only tokens/s at concurrency 1 through a router: the lean forward against transformers' path.

Two suites side by side (a target and a router each; one target with
``--lean-forward false``), the runs interleaved (lean, hf, lean, hf...), as
``llmesh bench`` starts services (2 torch threads, ``OMP_WAIT_POLICY=PASSIVE``).
Prints tokens/s (whole request, as the bench's ``target_only_tps``), decode
tokens/s (first to last token), TTFT and ``mbu`` (services.bench.machine;
the context is taken as 40 prompt tokens plus half the output).

    flock /tmp/bench.lock env REPEATS=3 NEW=64 python benchmarks/lean-forward/served_c1.py [MODEL]
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

import grpc

from services.bench import local_suite
from services.bench.loadgen import closed_loop, greedy_request
from services.bench.machine import machine_info, mbu
from services.common.paths import default_model_path
from services.common.stubs import router_pb2_grpc
from services.models.corpus import heldout_prompts

THREADS, PROMPTS_N = 2, 4


async def run(address: str, prompts: list[str], new_tokens: int) -> tuple[float, float, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for _ in range(60):  # until the router sees its target healthy
            warm = await closed_loop(stub, lambda i: greedy_request(prompts[0], 8, speculate=False), 1, 1,
                                     progress=False)
            if warm.results[0].ok:
                break
            await asyncio.sleep(1)
        res = await closed_loop(stub, lambda i: greedy_request(prompts[i % len(prompts)], new_tokens, speculate=False),
                                1, len(prompts), progress=False)
        ok = [x for x in res.results if x.ok]
        decode = statistics.median((len(x.tokens) - 1) / (x.e2e_s - x.ttft_s) for x in ok)
        return res.tokens_per_s, decode, statistics.median(x.ttft_s for x in ok)


def main() -> None:
    model = default_model_path(sys.argv[1] if len(sys.argv) > 1 else "target-large")
    new_tokens, repeats = int(os.environ.get("NEW", 64)), int(os.environ.get("REPEATS", 3))
    prompts = heldout_prompts(64, seed=0)[:PROMPTS_N]
    machine = machine_info(THREADS)
    arms = {"lean": {}, "hf": {"lean_forward": "false"}}
    specs = []
    for name, flags in arms.items():
        target = local_suite.target_spec(model, THREADS, name=f"target-{name}", **flags)
        specs += [target, dataclasses.replace(local_suite.router_spec([target.address]), name=f"router-{name}")]
    out: dict[str, list] = {name: [] for name in arms}
    with local_suite.running(specs, Path(tempfile.mkdtemp(prefix="llmesh-lean-"))) as addrs:
        for _ in range(repeats):
            for name in arms:
                out[name].append(asyncio.run(run(addrs[f"router-{name}"], prompts, new_tokens)))
    context = 40 + new_tokens / 2
    bandwidth = machine["memory_bandwidth_gbs"]
    for name, runs in out.items():
        tps, decode = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        print(f"{name}: tokens/s {tps:.2f} (runs {[round(r[0], 1) for r in runs]}), decode {decode:.2f}, "
              f"TTFT {statistics.median(r[2] for r in runs) * 1e3:.0f} ms, mbu {mbu(tps, model, context, bandwidth)}")
    print(machine)


if __name__ == "__main__":
    main()
