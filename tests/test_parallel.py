"""Model parallelism: TP, PP and TP x PP groups give TP=1's logits, and their shards are smaller.

The groups are real processes over Gloo (tests/parallel_probe.py is rank 0,
starting its worker ranks as the target service does), on the tiny random
Llama (4 heads, 2 KV heads, 2 layers). Each group costs a few seconds of
process start-up and model load per rank; three groups are run.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from services.common.config import ConfigError
from services.common.errors import Unavailable
from services.engine.engine import Engine
from services.engine.model_runner import ModelRunner, RunnerLost, load_model
from services.engine.sequence import GenerationRequest, SamplingOptions
from services.engine.settings import EngineSettings
from services.parallel.layout import Layout, balance_stages, split_micro_batches
from services.target.config import TargetConfig
from tests.parallel_probe import BLOCK_SIZE, NUM_BLOCKS, STEPS

REPO = Path(__file__).resolve().parents[1]
GROUP_TIMEOUT_S = 300


def test_stages_are_balanced_by_parameter_count_not_by_layer_count():
    # The embedding (first stage) weighs as much as two layers: the first stage gets fewer layers.
    assert balance_stages([10] * 6, 2, first_extra=20) == [range(0, 2), range(2, 6)]
    assert balance_stages([10] * 6, 2, first_extra=20, last_extra=20) == [range(0, 3), range(3, 6)]
    assert balance_stages([5, 5, 30, 5, 5, 5], 3) == [range(0, 2), range(2, 3), range(3, 6)]
    with pytest.raises(ValueError, match="at least 3 decoder layers"):
        balance_stages([1, 1], 3)


def test_micro_batches_cover_the_rows_in_order():
    assert split_micro_batches(5, 2) == [range(0, 3), range(3, 5)]
    assert split_micro_batches(1, 4) == [range(0, 1)]
    assert split_micro_batches(4, 1) == [range(0, 4)]


def test_ranks_are_laid_out_stage_major():
    lay = Layout(tp=2, pp=2, rank=3)
    assert (lay.stage, lay.tp_rank, lay.prev_rank, lay.next_rank, lay.logits_rank) == (1, 1, 1, None, 2)
    assert Layout(2, 2, 0).stage_ranks(1) == [2, 3]


def test_the_target_takes_the_parallel_flags_and_their_short_names():
    c = TargetConfig.from_args(["--tp", "2", "--pp", "2", "--micro-batches", "3"], env={})
    assert (c.tensor_parallel_size, c.pipeline_parallel_size, c.micro_batches) == (2, 2, 3)
    spec = c.parallel_spec()
    assert (spec.world_size, spec.micro_batches) == (4, 3)
    assert TargetConfig.from_args([], env={}).parallel_spec() is None
    with pytest.raises(ConfigError, match="node_rank"):
        TargetConfig.from_args(["--tp", "2", "--nnodes", "2", "--node-rank", "2", "--master-port", "1"], env={})
    with pytest.raises(ConfigError, match="master_port"):
        TargetConfig.from_args(["--tp", "2", "--nnodes", "2"], env={})


@pytest.fixture(scope="module")
def reference(tiny_models):
    """TP=1: the engine's own runner, in this process, over the same steps."""
    model, _ = load_model(tiny_models.target)
    runner = ModelRunner(model, NUM_BLOCKS, BLOCK_SIZE)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = sum(t.numel() * t.element_size() for pair in runner.cache.layers for t in pair)
    return [runner.forward(rows) for rows in STEPS], weight_bytes, kv_bytes


@pytest.mark.parametrize("tp,pp,micro_batches", [(2, 1, 1), (1, 2, 2), (2, 2, 2)],
                         ids=["tp2", "pp2-2micro", "tp2xpp2-2micro"])
def test_a_group_gives_tp1_logits_on_prefill_decode_verification_logprobs_and_mixed_rows(
        tiny_models, reference, tmp_path, tp, pp, micro_batches):
    out = tmp_path / "logits.pt"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "parallel_probe.py"), str(tiny_models.target),
                           str(tp), str(pp), str(micro_batches), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=GROUP_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    want, tp1_bytes, tp1_kv_bytes = reference
    for step, (w, g) in enumerate(zip(want, got["logits"])):
        assert len(w) == len(g)
        for row, (a, b) in enumerate(zip(w, g)):
            assert a.shape == b.shape, (step, row)
            assert torch.allclose(a, b, atol=1e-5, rtol=0), (step, row, (a - b).abs().max().item())
    stats = got["stats"]
    assert [s["rank"] for s in stats] == list(range(tp * pp))
    assert {(s["stage"], s["tp_rank"]) for s in stats} == {(s, t) for s in range(pp) for t in range(tp)}
    # Each rank holds about 1/(tp*pp) of the weights... at most 0.6 of TP=1's on this tiny model.
    assert max(s["weight_bytes"] for s in stats) <= 0.6 * tp1_bytes
    assert all(s["steps"] == len(STEPS) for s in stats)
    # Each rank's paged KV cache holds its layers' and KV heads' share of the same blocks
    # (tiny model: 2 layers, 2 KV heads, split evenly).
    assert all(s["kv_cache_bytes"] == tp1_kv_bytes // (tp * pp) for s in stats)


def test_a_lost_runner_stops_the_engine_and_fails_its_requests_unavailable(tiny_models):
    """What a rank's death does to rank 0's engine (the process-level test is in test_parallel_service)."""
    model, tokenizer = load_model(tiny_models.target)

    class LostRunner(ModelRunner):
        def forward(self, rows):
            raise RunnerLost("worker rank 1 (pid 0) exited with status -9")

    engine = Engine(LostRunner(model, 4), tokenizer, EngineSettings(num_slots=4, max_batch_size=4))
    died = threading.Event()
    engine.start(on_fatal=lambda exc: died.set())
    events: queue.Queue = queue.Queue()
    engine.submit(GenerationRequest(prompt_ids=[5, 6, 7], sampling=SamplingOptions(max_new_tokens=4)), events.put)
    last = events.get(timeout=60)
    assert isinstance(last.error, Unavailable) and last.finish_reason is not None
    assert died.wait(60)
    with pytest.raises(Unavailable):
        engine.submit(GenerationRequest(prompt_ids=[5], sampling=SamplingOptions(max_new_tokens=1)), events.put)
