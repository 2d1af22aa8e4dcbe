"""Engine-level A/B of the paged KV cache (issue 14), run from a tree's root:

  PYTHONPATH=.:build/gen python benchmarks/paged-kv-ab/engine_ab.py c32 MODEL_DIR
      c32 greedy decode throughput (32 sequences at once, 64 new tokens each; the
      `batching` scenario's c32 point without the router hop): tokens/s.
      Works on the slot-cache tree (main before issue 14) and on the paged tree.
  PYTHONPATH=.:build/gen python benchmarks/paged-kv-ab/engine_ab.py prefix MODEL_DIR on|off
      shared-prefix workload: 4 groups x 6 requests, each group sharing a
      PREFIX-token prefix, 8-token distinct suffixes, 16 new tokens, Poisson
      arrivals at RATE/s (open loop) into the running engine: TTFT p50/p90,
      tokens/s, prefix hit rate, and the greedy tokens (to compare on vs off).

Prints one JSON line. Fixed seeds: both arms get the same prompts and arrivals.
"""
import json, random, statistics, sys, threading, time
import torch
from services.engine.build import build_engine
from services.engine.settings import EngineSettings
from services.engine.sequence import GenerationRequest, SamplingOptions

PREFIX, RATE = 1000, 2.0


def c32(model_dir):
    engine = build_engine(model_dir, EngineSettings(max_batch_size=32, max_wait_ms=0, num_slots=64)).engine
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 4000) for _ in range(rng.randrange(20, 60))] for _ in range(32)]
    out = []
    for rep in range(4):  # the first is a warm-up
        done = []
        for p in prompts:
            engine.submit(GenerationRequest(prompt_ids=p, sampling=SamplingOptions(max_new_tokens=64, ignore_eos=True)),
                          lambda ev: ev.finish_reason is not None and done.append(1))
        t = time.perf_counter()
        while len(done) < len(prompts):
            engine.run_once()
        if rep:
            out.append(32 * 64 / (time.perf_counter() - t))
    return {"arm": "c32", "tokens_per_s_runs": [round(x, 1) for x in out], "tokens_per_s": round(statistics.median(out), 1)}


def prefix(model_dir, on):
    kw = {} if "prefix_caching" not in build_engine.__code__.co_varnames else {"prefix_caching": on}
    engine = build_engine(model_dir, EngineSettings(max_batch_size=32, max_wait_ms=0, num_slots=64), **kw).engine
    engine.runner.warmup()
    engine.start()
    rng = random.Random(1)
    groups = [[rng.randrange(10, 4000) for _ in range(PREFIX)] for _ in range(4)]
    reqs = [g + [rng.randrange(10, 4000) for _ in range(8)] for _ in range(6) for g in groups]
    rng.shuffle(reqs)
    gaps = [rng.expovariate(RATE) for _ in reqs]
    results, finished = [None] * len(reqs), threading.Semaphore(0)

    def sink(i):
        toks = []
        def f(ev):
            toks.extend(ev.token_ids)
            if ev.finish_reason is not None:
                results[i] = (toks, ev.timeline.ttft_tpot()[0], ev.error)
                finished.release()
        return f
    t0 = time.perf_counter()
    for i, (p, gap) in enumerate(zip(reqs, gaps)):
        time.sleep(gap)
        engine.submit(GenerationRequest(prompt_ids=p, sampling=SamplingOptions(max_new_tokens=16, ignore_eos=True)), sink(i))
    for _ in reqs:
        finished.acquire()
    wall = time.perf_counter() - t0
    engine.stop()
    ttfts = sorted(r[1] for r in results)
    load = engine.load()
    return {"arm": "prefix_cache_" + ("on" if on else "off"), "requests": len(reqs), "prefix_tokens": PREFIX,
            "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
            "ttft_p90_ms": round(1000 * ttfts[int(0.9 * (len(ttfts) - 1))], 1),
            "tokens_per_s": round(16 * len(reqs) / wall, 1),
            "prefix_hit_rate": round(load.prefix_cache_hits / load.prefix_cache_queries, 3) if getattr(load, "prefix_cache_queries", 0) else 0.0,
            "errors": sum(r[2] is not None for r in results), "tokens": [r[0] for r in results]}


if __name__ == "__main__":
    torch.manual_seed(0)
    if sys.argv[1] == "c32":
        print(json.dumps(c32(sys.argv[2])))
    else:
        print(json.dumps(prefix(sys.argv[2], sys.argv[3] == "on")))
