"""Engine overhead per step with a free forward pass (a fake runner), everything else the real engine.

Run from a tree's root: `PYTHONPATH=.:build/gen python benchmarks/house-ab/stepbench.py ~/.cache/llmesh/models/target`.
`--observer` adds the Prometheus observer a model service has with --metrics-port (issue 13).
"""
import statistics, sys, time
import torch
from transformers import AutoTokenizer
from services.engine.engine import Engine
from services.engine.settings import EngineSettings
from services.engine.sequence import GenerationRequest, SamplingOptions

VOCAB = 4096
class Cache:
    capacity_tokens = 64 * 2048
    num_slots = 64
class FakeRunner:
    max_len = 2048; vocab_size = VOCAB; cache = Cache()
    # The real per-row precondition check, where the runner has one (issue 11 and later).
    from services.engine.model_runner import ModelRunner as _Real
    if hasattr(_Real, "check"):
        check = _Real.check
    def timed_forward(self, rows):
        out = []
        for r in rows:
            lg = torch.zeros(r.keep if hasattr(r, 'keep') else 1, VOCAB); lg[:, (len(r.tokens) * 7) % 300 + 50] = 1.0
            out.append(lg)
        return out, 0.0
tok = AutoTokenizer.from_pretrained(sys.argv[1])
OBSERVE = "--observer" in sys.argv[2:]
def run(batch, new_tokens=200):
    eng = Engine(FakeRunner(), tok, EngineSettings(max_batch_size=64, max_wait_ms=0, num_slots=64))
    if OBSERVE:
        from services.serving.prometheus_metrics import ServingMetrics
        eng.observer = ServingMetrics("bench", "bench", "target", eng.load, 8)
    done = []
    for i in range(batch):
        eng.submit(GenerationRequest(prompt_ids=[5 + i, 6, 7], sampling=SamplingOptions(max_new_tokens=new_tokens, ignore_eos=True)),
                   lambda ev: ev.finish_reason is not None and done.append(1))
    steps = 0; t = time.perf_counter()
    while len(done) < batch:
        eng.run_once(); steps += 1
    return (time.perf_counter() - t) / steps * 1e6
for b in (1, 16, 32):
    xs = [run(b) for _ in range(5)]
    print(f"batch {b}: {statistics.median(xs):.0f} us/step")
