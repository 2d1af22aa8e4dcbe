"""Float extremes in sampling: every finite temperature >= 0, top-k/top-p corners,
ties and unusable logits, from the warping rule up to an engine that keeps
serving the sequence's batch mates."""

from __future__ import annotations

import pytest
import torch

from services.common.errors import ModelFault
from services.engine import sampler
from services.engine.build import build_engine
from services.engine.sequence import FinishReason, GenerationRequest, SamplingOptions
from services.engine.settings import EngineSettings
from tests.conftest import hf_greedy

#: Temperatures that break a naive ``softmax(logits / T)``: float32 and float64
#: denormals, tiny normals, and huge values up to float32's (the wire's) maximum.
TINY_TEMPERATURES = [1e-39, 1.4e-45, 5e-324, 1e-300, 1e-30]
HUGE_TEMPERATURES = [1e30, 3.4e38, 1e300]


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES + HUGE_TEMPERATURES + [0.7, 1.0])
def test_warping_is_finite_for_every_finite_temperature(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 30
    logits[1, 7] = float("-inf")  # a token the model itself masks
    opts = SamplingOptions(temperature=temperature, top_k=10, top_p=0.9)
    scores = sampler.warp_scores(logits, opts)
    assert scores.dtype == torch.float64
    assert not torch.isnan(scores).any() and not torch.isposinf(scores).any()
    assert (scores.max(-1).values == 0).all()
    probs = sampler.warp(logits, opts)
    assert torch.allclose(probs.sum(-1), torch.ones(3, dtype=torch.float64))
    assert probs[1, 7] == 0
    token, dist = sampler.sample(logits[0], opts, seed=5, position=3, want_probs=True)
    assert dist[token] > 0


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_a_temperature_too_small_to_matter_samples_the_argmax(temperature):
    torch.manual_seed(1)
    logits = torch.randn(100)
    for seed in range(20):
        token, _ = sampler.sample(logits, SamplingOptions(temperature=temperature), seed, 0)
        assert token == int(logits.argmax())


def test_a_huge_temperature_samples_every_kept_token_alike():
    logits = torch.tensor([10.0, 0.0, -10.0, float("-inf")])
    probs = sampler.warp(logits, SamplingOptions(temperature=1e300))
    assert torch.allclose(probs, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0], dtype=torch.float64))


def test_top_k_corners_and_ties():
    logits = torch.tensor([1.0, 3.0, 3.0, 2.0, 0.0])
    opts = SamplingOptions(temperature=1.0)
    full = sampler.warp(logits, opts)
    for k in (5, 6, 10**9):  # k >= vocab: nothing is cut
        assert torch.equal(sampler.warp(logits, SamplingOptions(temperature=1.0, top_k=k)), full)
    tied = sampler.warp(logits, SamplingOptions(temperature=1.0, top_k=1))
    assert tied.tolist() == [0.0, 0.5, 0.5, 0.0, 0.0]  # both tokens tied for first are kept
    two = sampler.warp(logits, SamplingOptions(temperature=1.0, top_k=2))
    assert two.tolist() == [0.0, 0.5, 0.5, 0.0, 0.0]


@pytest.mark.parametrize("top_p", [1e-45, 1e-8, 0.5])
def test_a_tiny_top_p_keeps_the_most_likely_tokens_ties_included(top_p):
    logits = torch.tensor([1.0, 3.0, 3.0, 2.0, 0.0])
    probs = sampler.warp(logits, SamplingOptions(temperature=1.0, top_p=top_p))
    assert probs.tolist() == [0.0, 0.5, 0.5, 0.0, 0.0]
    for seed in range(10):
        assert sampler.sample(logits, SamplingOptions(temperature=1.0, top_p=top_p), seed, 0)[0] in (1, 2)


def test_top_p_keeps_the_token_that_crosses_it():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    kept = sampler.warp(torch.log(probs), SamplingOptions(temperature=1.0, top_p=0.7))
    assert kept.tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_or_positive_infinite_logits_are_a_model_fault(bad, temperature):
    logits = torch.zeros(10)
    logits[3] = bad
    with pytest.raises(ModelFault, match="NaN|inf"):
        sampler.sample(logits, SamplingOptions(temperature=temperature), 1, 0)


def test_all_masked_logits_are_a_model_fault():
    with pytest.raises(ModelFault, match="masked every token"):
        sampler.warp_scores(torch.full((2, 10), float("-inf")), SamplingOptions(temperature=1.0))


def test_gumbel_draws_follow_the_distribution():
    from scipy.stats import chisquare

    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    counts = torch.zeros(4)
    for seed in range(8000):
        counts[sampler.draw(probs, seed, 17)] += 1
    assert chisquare(counts.numpy(), (probs * 8000).numpy()).pvalue > 1e-3


def test_noise_is_the_same_for_the_ids_two_vocabularies_share():
    small, big = sampler.gumbel_noise(9, 4, 300), sampler.gumbel_noise(9, 4, 384)
    assert torch.equal(small, big[:300])
    assert torch.isfinite(big).all()


# -- through the engine -----------------------------------------------------------------

class Recorder:
    def __init__(self):
        self.tokens, self.finish, self.error = [], None, None

    def __call__(self, ev):
        self.tokens += ev.token_ids
        if ev.finish_reason is not None:
            self.finish, self.error = ev.finish_reason, ev.error


def make_engine(tiny_models, **kw):
    base = dict(max_batch_size=16, max_wait_ms=0.0, max_batch_tokens=512, max_queue=64, num_slots=16)
    base.update(kw)
    return build_engine(str(tiny_models.target), EngineSettings(**base)).engine


def drain(engine, limit=500):
    for _ in range(limit):
        if not engine.run_once() and not engine.scheduler.has_work():
            return
    raise AssertionError("engine did not finish")


def request(prompt, n, **sampling):
    return GenerationRequest(prompt_ids=prompt, sampling=SamplingOptions(max_new_tokens=n, ignore_eos=True,
                                                                         **sampling))


def test_extreme_sampling_values_are_served_beside_greedy_batch_mates(tiny_models, reference_model):
    engine = make_engine(tiny_models)
    vocab = tiny_models.vocab_size
    prompt = [11, 12, 13]
    cases = ([{"temperature": t} for t in TINY_TEMPERATURES + HUGE_TEMPERATURES]
             + [{"temperature": 1.0, "top_k": k} for k in (1, vocab, vocab + 1, 2**31 - 1)]
             + [{"temperature": 1.0, "top_p": p} for p in (1.4e-45, 1e-8)]
             + [{"temperature": 1e-39, "top_k": 1, "top_p": 1e-45, "seed": 2**64 - 1}])
    recs = [Recorder() for _ in cases]
    for case, rec in zip(cases, recs):
        engine.submit(request(prompt, 6, **case), rec)
    mate = Recorder()
    engine.submit(request([4, 5, 6], 6), mate)
    drain(engine)
    greedy = hf_greedy(reference_model, prompt, 6)
    for case, rec in zip(cases, recs):
        assert rec.finish is FinishReason.LENGTH and rec.error is None, case
        assert len(rec.tokens) == 6 and all(0 <= t < vocab for t in rec.tokens)
        if case["temperature"] < 1e-20 or case.get("top_k") == 1 or case.get("top_p", 1) < 1e-6:
            assert rec.tokens == greedy, case  # all of the mass on the argmax
    assert mate.tokens == hf_greedy(reference_model, [4, 5, 6], 6)


def poison_slot(engine, monkeypatch, value_of):
    """Makes the forward return ``value_of(logits)`` for the row of the first
    sequence admitted (the one holding block 1, the first handed out)."""
    original = engine.runner.timed_forward

    def forward(rows):
        out, took = original(rows)
        return [value_of(lg) if r.block_table[0] == 1 else lg for r, lg in zip(rows, out)], took

    monkeypatch.setattr(engine.runner, "timed_forward", forward)
    return original


@pytest.mark.parametrize("poison, temperature", [
    (lambda lg: torch.full_like(lg, float("nan")), 0.0),
    (lambda lg: lg.index_fill(-1, torch.tensor([5]), float("nan")), 1.0),
    (lambda lg: lg.index_fill(-1, torch.tensor([5]), float("inf")), 0.7),
    (lambda lg: torch.full_like(lg, float("-inf")), 1.0),
])
def test_unusable_logits_fail_that_sequence_and_the_engine_keeps_serving(tiny_models, reference_model,
                                                                         monkeypatch, poison, temperature):
    engine = make_engine(tiny_models)
    victim, mates = Recorder(), [Recorder(), Recorder()]
    engine.submit(request([1, 2, 3], 5, temperature=temperature, seed=3), victim)  # block 1
    for i, rec in enumerate(mates):
        engine.submit(request([7 + i, 8, 9], 5), rec)
    original = poison_slot(engine, monkeypatch, poison)
    drain(engine)
    assert victim.finish is FinishReason.ERROR and isinstance(victim.error, ModelFault)
    assert "Traceback" not in str(victim.error)
    for i, rec in enumerate(mates):
        assert rec.finish is FinishReason.LENGTH and rec.tokens == hf_greedy(reference_model, [7 + i, 8, 9], 5)
    monkeypatch.setattr(engine.runner, "timed_forward", original)
    after = Recorder()
    engine.submit(request([1, 2, 3], 4), after)
    drain(engine)
    assert after.tokens == hf_greedy(reference_model, [1, 2, 3], 4)
    assert engine.load().metrics.counters["errors_total"] == 1


def test_any_fault_while_a_sequence_takes_its_tokens_fails_only_that_sequence(tiny_models, reference_model,
                                                                              monkeypatch):
    """Not only the sampler's: whatever raises for one row (here a detokenizer
    fault) fails that row's sequence, as an internal error its client sees
    without a traceback, and the loop goes on."""
    engine = make_engine(tiny_models)
    victim, mate = Recorder(), Recorder()
    seq = engine.submit(request([1, 2, 3], 5), victim)
    engine.submit(request([4, 5, 6], 5), mate)
    engine.run_once()

    def broken(token):
        raise RuntimeError("injected")

    monkeypatch.setattr(seq.detok, "add", broken)
    drain(engine)
    assert victim.finish is FinishReason.ERROR and isinstance(victim.error, RuntimeError)
    assert mate.tokens == hf_greedy(reference_model, [4, 5, 6], 5)
    assert not engine.scheduler.has_work() and engine.scheduler.slots.free == 16


def test_seeded_sampling_at_extreme_temperatures_is_reproducible(tiny_models):
    def run(temperature):
        engine = make_engine(tiny_models)
        rec = Recorder()
        engine.submit(request([3, 1, 4], 8, temperature=temperature, seed=77), rec)
        drain(engine)
        return rec.tokens

    for t in (1e-39, 1e300, 0.9):
        assert run(t) == run(t)
