"""Speculation figures count only emitted tokens: per request (SpecStats, and so
GenerateChunk.speculation) and in the engine's counters (and so load reports
and Prometheus), when a sequence ends inside a verified round."""

from __future__ import annotations

import pytest

from services.engine.build import build_engine
from services.engine.sequence import FinishReason, GenerationRequest, SamplingOptions
from services.engine.settings import EngineSettings
from services.engine.speculation import RoundCounts
from services.speculative.gamma import SpeculationSettings
from services.speculative.speculator import Speculator
from services.speculative.state import SpecStats, SpeculationRequest
from tests.helpers import OracleProposer, Recorder

PROMPT = [40, 41, 42, 43]
GAMMA = 4


@pytest.mark.parametrize("gamma, accepted, taken, ended, want", [
    (4, 4, 5, False, (4, 4, 5)),  # every proposal kept, the target's bonus token too
    (4, 1, 2, False, (4, 1, 2)),  # rejected at 1: the positions after it are filled later
    (4, 4, 2, True, (2, 2, 2)),   # ended on the 2nd accepted token: 2 proposals had positions
    (4, 1, 2, True, (2, 1, 2)),   # ended on the target's own token after 1 accepted
    (4, 4, 5, True, (4, 4, 5)),   # ended on the bonus token: everything was emitted
    (2, 0, 1, True, (1, 0, 1)),
])
def test_round_counts_count_only_positions_the_output_has(gamma, accepted, taken, ended, want):
    c = RoundCounts.of(gamma, accepted, taken, ended)
    assert (c.proposed, c.accepted, c.emitted) == want


def make_engine(tiny_models):
    speculator = Speculator(SpeculationSettings(disable_by_batch_size=64, min_acceptance=0.0))
    return build_engine(str(tiny_models.target), EngineSettings(max_batch_size=8, max_wait_ms=0.0, num_slots=8),
                        speculation=speculator).engine


def drain(engine, limit=500):
    for _ in range(limit):
        if not engine.run_once() and not engine.scheduler.has_work():
            return
    raise AssertionError("engine did not finish")


def greedy(n, stop=(), ignore_eos=True, speculation=None):
    return GenerationRequest(prompt_ids=PROMPT, sampling=SamplingOptions(max_new_tokens=n, stop=stop,
                                                                         ignore_eos=ignore_eos),
                             speculation=speculation)


@pytest.fixture(scope="module")
def reference(tiny_models):
    engine = make_engine(tiny_models)
    rec = Recorder()
    engine.submit(greedy(40), rec)
    drain(engine)
    return rec


def ends_inside_a_round(reference, fresh_token: bool) -> int:
    """An index k at which the sequence ends on the 2nd token of a round (with
    the prefill's token first and rounds of gamma 4 all accepted: 5 tokens a
    round), such that the ending could not happen earlier."""
    for k in range(7, 31, GAMMA + 1):
        if fresh_token and reference.tokens[k] in reference.tokens[:k]:
            continue
        if not fresh_token and reference.texts[k] == reference.texts[k - 1]:
            continue
        return k
    pytest.skip("no suitable ending in this reference run")


def run_speculating(tiny_models, reference, budget, ending):
    engine = make_engine(tiny_models)
    proposer = OracleProposer(reference.tokens, len(PROMPT))  # always right: every proposal is kept
    spec = SpeculationRequest(proposer, GAMMA, GAMMA, GAMMA, fixed=True)
    if ending == "eos":
        k = ends_inside_a_round(reference, fresh_token=True)
        engine.eos_token_ids = {reference.tokens[k]}
        req = greedy(budget, ignore_eos=False, speculation=spec)
    else:
        k = ends_inside_a_round(reference, fresh_token=False)
        req = greedy(budget, stop=(reference.texts[k],), speculation=spec)
    rec = Recorder()
    engine.submit(req, rec)
    drain(engine)
    return engine, rec, k


@pytest.mark.parametrize("ending", ["eos", "stop"])
@pytest.mark.parametrize("extra_budget", [0, 3, 9])
def test_a_sequence_ending_inside_a_round_counts_only_what_it_emitted(tiny_models, reference, ending,
                                                                      extra_budget):
    engine, rec, k = run_speculating(tiny_models, reference, k_budget(reference, ending) + extra_budget, ending)
    assert rec.finish is (FinishReason.EOS if ending == "eos" else FinishReason.STOP)
    rounds = (k - 1) // (GAMMA + 1) + 1  # k = 1 + 5 (rounds - 1) + 1
    s: SpecStats = rec.spec
    assert s.rounds == rounds
    if extra_budget >= 3:  # the last round proposed 4 and the sequence ended on the 2nd
        assert s.accepted == s.proposed == GAMMA * (rounds - 1) + 2
        assert s.accepted_per_position == [rounds, rounds, rounds - 1, rounds - 1]
    # Tokens after the prefill's all came from rounds: k + 1 tokens ended the sequence.
    assert s.mean_accepted_length == pytest.approx(k / rounds) and s.emitted == k
    m = engine.load().metrics
    assert m.counters["accepted_tokens_total"] == s.accepted
    assert m.counters["proposed_tokens_total"] == s.proposed
    assert m.counters["speculation_rounds_total"] == s.rounds
    assert m.mean_accepted_length == pytest.approx(s.mean_accepted_length)
    assert m.acceptance_rate == pytest.approx(s.accepted / s.proposed)


def k_budget(reference, ending) -> int:
    """max_new_tokens that ends exactly at the ending token (k + 1 tokens)."""
    return ends_inside_a_round(reference, fresh_token=ending == "eos") + 1


def test_the_same_output_under_two_budgets_reports_the_same_figures(tiny_models, reference):
    """The issue's case: the stop completes at the same token under a budget
    that leaves room after it and one that leaves more: equal figures."""
    budget = k_budget(reference, "stop")
    _, a, _ = run_speculating(tiny_models, reference, budget + 3, "stop")
    _, b, _ = run_speculating(tiny_models, reference, budget + 9, "stop")
    assert a.tokens == b.tokens
    assert (a.spec.accepted, a.spec.proposed, a.spec.emitted, a.spec.accepted_per_position) == \
           (b.spec.accepted, b.spec.proposed, b.spec.emitted, b.spec.accepted_per_position)


def test_a_sequence_that_runs_on_keeps_the_usual_figures(tiny_models, reference):
    engine = make_engine(tiny_models)
    proposer = OracleProposer(reference.tokens, len(PROMPT), wrong_every=3)
    rec = Recorder()
    engine.submit(greedy(21, speculation=SpeculationRequest(proposer, GAMMA, GAMMA, GAMMA, fixed=True)), rec)
    drain(engine)
    s = rec.spec
    assert rec.tokens == reference.tokens[:21]
    assert s.emitted == s.accepted + s.rounds  # every round emitted the target's own token
    assert 0 < s.accepted < s.proposed
