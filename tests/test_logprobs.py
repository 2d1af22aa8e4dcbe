"""Logprobs from the engine: each generated token's log-probability under the
target's raw distribution, also for tokens accepted from a draft (the verify
pass's logits), and the prompt's under a chunked prefill, checked against the
reference model's own log-softmax."""

from __future__ import annotations

import pytest
import torch

from services.engine.build import build_engine
from services.engine.sequence import GenerationRequest, SamplingOptions
from services.engine.settings import EngineSettings
from services.speculative.gamma import SpeculationSettings
from services.speculative.speculator import Speculator
from services.speculative.state import SpeculationRequest
from tests.helpers import OracleProposer, Recorder

PROMPT = [21, 22, 23, 24, 40, 41, 42, 43, 50, 51, 52, 53, 60, 61]


def make_engine(tiny_models, max_batch_tokens=2048, block_size=16):
    speculator = Speculator(SpeculationSettings(min_acceptance=0.0))
    settings = EngineSettings(max_batch_size=8, max_wait_ms=0.0, num_slots=8, max_batch_tokens=max_batch_tokens)
    return build_engine(str(tiny_models.target), settings, speculation=speculator, block_size=block_size).engine


def run(engine, request) -> Recorder:
    rec = Recorder()
    engine.submit(request, rec)
    for _ in range(1000):
        if not engine.run_once() and not engine.scheduler.has_work():
            return rec
    raise AssertionError("engine did not finish")


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def request(n, top=None, prompt_logprobs=False, speculation=None, **sampling):
    return GenerationRequest(prompt_ids=list(PROMPT), sampling=SamplingOptions(max_new_tokens=n, ignore_eos=True,
                                                                               **sampling),
                             logprobs=top, prompt_logprobs=prompt_logprobs, speculation=speculation)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 20, "seed": 5}])
def test_tokens_accepted_from_a_draft_score_under_the_targets_distribution(tiny_models, reference_model, sampling):
    plain = run(make_engine(tiny_models), request(16, top=3, **sampling))
    proposer = OracleProposer(plain.tokens, len(PROMPT), wrong_every=4)
    spec = run(make_engine(tiny_models), request(16, top=3, speculation=SpeculationRequest(proposer, gamma=3),
                                                 **sampling))
    assert spec.tokens == plain.tokens and 0 < spec.spec.accepted  # some tokens came from the draft
    ref = reference_logprobs(reference_model, PROMPT + plain.tokens)
    for i, (a, b) in enumerate(zip(spec.logprobs, plain.logprobs, strict=True)):
        position = len(PROMPT) + i - 1
        assert a.token_id == b.token_id == plain.tokens[i]
        assert a.logprob == pytest.approx(ref[position, a.token_id].item(), abs=1e-4)
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
        best = torch.topk(ref[position], 3)
        assert [t for t, _ in a.top] == best.indices.tolist()
        assert [v for _, v in a.top] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert plain.prompt_logprobs == []  # not asked


def test_prompt_logprobs_over_a_chunked_prefill(tiny_models, reference_model):
    rec = run(make_engine(tiny_models, max_batch_tokens=8), request(2, top=1, prompt_logprobs=True))
    assert len(rec.prompt_logprobs) == len(PROMPT) and len(rec.logprobs) == 2
    assert rec.prompt_logprobs[0].logprob is None and rec.prompt_logprobs[0].token_id == PROMPT[0]
    ref = reference_logprobs(reference_model, PROMPT)
    got = [e.logprob for e in rec.prompt_logprobs[1:]]
    assert got == pytest.approx([ref[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))], abs=1e-4)
    assert [e.token_id for e in rec.prompt_logprobs] == PROMPT
    assert all(len(e.top) == 1 for e in rec.prompt_logprobs[1:])
    # The generated tokens are those of a run without prompt logprobs (the logits kept do not change them).
    assert rec.tokens == run(make_engine(tiny_models), request(2)).tokens


def test_prompt_logprobs_of_a_prompt_whose_prefix_is_cached(tiny_models, reference_model):
    """A prompt already in the prefix cache still gets every position's logprob
    (lm-evaluation-harness scores the same context many times)."""
    engine = make_engine(tiny_models, block_size=4)
    run(engine, request(2))  # caches the prompt's three full blocks
    rec = run(engine, request(2, top=1, prompt_logprobs=True))
    ref = reference_logprobs(reference_model, PROMPT)
    assert len(rec.prompt_logprobs) == len(PROMPT)
    got = [e.logprob for e in rec.prompt_logprobs[1:]]
    assert got == pytest.approx([ref[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))], abs=1e-4)
