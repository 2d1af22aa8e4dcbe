"""The speculation cost model: the pure gamma decision, the measured costs, and
the Speculator acting on them (no model, no clock: steps are fed by hand)."""

from __future__ import annotations

import pytest
import torch

from services.engine.scheduler import Row
from services.engine.sequence import GenerationRequest, SamplingOptions, Sequence, Status
from services.speculative.cost_model import (Acceptance, Speculating, StepCosts, bucket, choose_gamma, expected_tokens,
                                             goodput)
from services.speculative.gamma import SpeculationSettings
from services.speculative.speculator import Speculator
from services.speculative.state import Proposal, SpeculationRequest


def one(alphas, ready=None, sat_out=None):
    """Speculating sequences of one proposal method, with acceptances ``alphas``."""
    return [Speculating(list(alphas), ready, sat_out)]


def test_expected_tokens_is_leviathans_formula():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(0.8, 3) == pytest.approx((1 - 0.8 ** 4) / 0.2)


def test_cheap_verification_and_good_drafts_pick_a_long_gamma():
    # Weight-bound forward: a step of 9 tokens per row costs little more than 1.
    periods = [10.0 + 0.2 * g for g in range(9)]
    assert choose_gamma(one([0.9]), 0, periods) == 8
    assert choose_gamma(one([0.9, 0.8]), 0, periods) == 8


def test_verification_that_costs_more_than_it_saves_turns_speculation_off():
    # Compute-bound forward (a big batch): every proposed token costs almost a step.
    periods = [10.0 + 9.0 * g for g in range(9)]
    assert choose_gamma(one([0.6] * 16), 0, periods) == 0
    # ... and a draft that is never right never pays, however cheap verifying is.
    assert choose_gamma(one([0.0]), 0, [10.0 + 0.01 * g for g in range(9)]) == 0


def test_the_optimum_is_in_between_when_costs_grow_and_acceptance_is_middling():
    periods = [10.0 + 4.0 * g for g in range(9)]
    gamma = choose_gamma(one([0.7]), 0, periods)
    assert 0 < gamma < 8
    rates = [goodput(one([0.7]), 0, g, periods[g]) for g in range(9)]
    assert rates[gamma] == max(rates)


def test_plain_rows_count_but_do_not_gain():
    # One good speculating row among many plain ones: widening every row is not worth it.
    periods = [10.0 + 2.0 * g for g in range(5)]
    assert choose_gamma(one([0.9]), 0, periods) > 0
    assert choose_gamma(one([0.9]), 15, periods) == 0


def test_nothing_to_speculate_or_no_gamma_means_zero_and_lowest_forces_a_round():
    assert choose_gamma(one([]), 4, [1.0, 1.0]) == 0
    assert choose_gamma(one([0.9]), 0, [1.0]) == 0
    assert choose_gamma(one([0.0]), 0, [1.0, 5.0, 9.0], lowest=1) == 1


def test_buckets_are_powers_of_two():
    assert [bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32)] == [1, 2, 4, 4, 8, 8, 16, 16, 32, 32]


def test_step_costs_estimate_unmeasured_widths_from_the_measured_ones():
    costs = StepCosts()
    assert costs.period(4, 0) is None and costs.periods(4, 3) is None
    costs.observe(4, 0, forward_s=0.010, gap_s=0.001, now=1.0)
    # Only decode measured: a wider step is taken to cost the same (so it gets tried).
    assert costs.periods(3, 2) == pytest.approx([0.011] * 3)
    costs.observe(4, 4, forward_s=0.030, gap_s=0.009, now=2.0)
    # The line through width 1 (10 ms) and width 5 (30 ms): width 3 costs 20 ms; gaps 1 and 9 ms: gamma 2 is 5 ms.
    assert costs.period(4, 2) == pytest.approx(0.020 + 0.005)
    assert costs.period(4, 4) == pytest.approx(0.039)
    assert costs.speculated_at(4) == 2.0 and costs.speculated_at(1) is None
    assert costs.table()[4]["forward_ms"] == {1: 10.0, 5: 30.0}


def test_acceptance_estimate_follows_the_rounds():
    good, bad = Acceptance(), Acceptance()
    for _ in range(10):
        good.update(4, 4)
        bad.update(0, 4)
    assert good.alpha(0.5) > 0.95 and bad.alpha(0.5) < 0.1
    assert Acceptance().alpha(0.3) == pytest.approx(0.3)  # nothing seen: the prior


class InstantProposer:
    def __init__(self):
        self.rounds = []

    def propose(self, round_, on_result):
        self.rounds.append(round_.gamma)
        on_result(Proposal([1] * round_.gamma), None)

    def close(self):
        pass


def speculating(speculator, n, prompt=(1, 2, 3)):
    seqs = []
    for _ in range(n):
        request = GenerationRequest(prompt_ids=list(prompt), sampling=SamplingOptions(max_new_tokens=64))
        seq = Sequence(request=request, sink=lambda ev: None, arrival=0.0)
        seq.tokens = list(prompt)
        seq.status = Status.RUNNING
        seq.spec = speculator.open(SpeculationRequest(InstantProposer()), post=lambda fn: fn(0.0))
        seqs.append(seq)
    return seqs


def feed(speculator, seqs, gamma, forward_s, gap_s, now, accepted=None):
    """One step of ``seqs`` verifying ``gamma`` proposals each, ``accepted`` of them kept."""
    speculator.after_forward([Row(seqs[0], 0, 3)], 0.0, now - forward_s - gap_s)  # a prefill pass: the mark
    speculator.after_forward([Row(s, 0, 1, [1] * gamma) for s in seqs], forward_s, now)
    if gamma:
        for s in seqs:
            s.spec.control.update(gamma if accepted is None else accepted, gamma)


def test_the_speculator_stops_where_its_measured_verify_cost_outweighs_the_gain():
    speculator = Speculator()
    assert speculator.uses_cost_model
    seqs = speculating(speculator, 16)
    # Nothing measured at batch 16 yet: it tries speculation.
    speculator.before_schedule(seqs, 16)
    assert speculator.gamma > 0
    for t in range(10):  # measured: a verify of 5 tokens per row costs 4x a decode step
        feed(speculator, seqs, 0, 0.010, 0.001, now=1.0 + t)
        feed(speculator, seqs, 4, 0.040, 0.010, now=1.5 + t, accepted=2)
    speculator.after_tokens(seqs[0], 11.0, 16, room=10)
    seqs[0].spec.waiting = True  # a round under way
    for s in seqs[:-1]:
        s.first_token_at = 11.0  # decoding; the last one is still prefilling
    speculator.before_schedule(seqs, 16)
    assert speculator.gamma == 0
    assert not seqs[0].spec.waiting and seqs[0].spec.stats.dropped_by_batch_size == 1
    # Every decoding request of the batch can tell its client why it saw no round (SpeculationStats).
    assert [s.spec.stats.steps_not_speculated for s in seqs] == [1] * 15 + [0]
    assert seqs[1].spec.stats.not_speculated_reason == (
        "the cost model judged that speculating would not pay with 16 sequences running")
    before = len(seqs[1].spec.proposer.rounds)
    speculator.after_tokens(seqs[1], 11.0, 16, room=10)
    assert len(seqs[1].spec.proposer.rounds) == before  # no round while it does not pay


def test_the_speculator_speculates_where_verifying_is_nearly_free():
    speculator = Speculator()
    seqs = speculating(speculator, 1)
    for t in range(10):
        feed(speculator, seqs, 0, 0.010, 0.001, now=1.0 + t)
        feed(speculator, seqs, 4, 0.011, 0.002, now=1.5 + t, accepted=4)
    speculator.before_schedule(seqs, 1)
    assert speculator.gamma >= 4
    speculator.after_tokens(seqs[0], 11.0, 1, room=3)
    assert seqs[0].spec.proposer.rounds[-1] == 3  # capped by the room the sequence has left


def test_a_bucket_that_stopped_speculating_tries_again_after_explore_s():
    speculator = Speculator(SpeculationSettings(explore_s=5.0))
    seqs = speculating(speculator, 16)
    for t in range(10):
        feed(speculator, seqs, 0, 0.010, 0.001, now=1.0 + t * 0.1)
        feed(speculator, seqs, 4, 0.040, 0.010, now=1.05 + t * 0.1, accepted=1)
    feed(speculator, seqs, 0, 0.010, 0.001, now=3.0)
    speculator.before_schedule(seqs, 16)
    assert speculator.gamma == 0
    feed(speculator, seqs, 0, 0.010, 0.001, now=8.0)  # 7 s since it last verified proposals here
    speculator.before_schedule(seqs, 16)
    assert speculator.gamma > 0
    feed(speculator, seqs, 4, 0.040, 0.010, now=8.1, accepted=1)  # the round: it still does not pay
    for now, explores in ((9.0, False), (14.0, False), (18.2, True)):  # so the next waits twice as long
        feed(speculator, seqs, 0, 0.010, 0.001, now=now)
        speculator.before_schedule(seqs, 16)
        assert (speculator.gamma > 0) is explores, now


def test_an_exploring_round_doubles_the_wait_once_however_often_its_step_is_planned():
    """While the drafts compute an exploring round, the engine plans the step again (nothing to run yet) and
    asks for the decision each time (2026-12-02, served at two streams: two or three plans a step). The round
    is counted once: the wait after it doubles, and the round asked is kept, not dropped, meanwhile."""
    speculator = Speculator(SpeculationSettings(explore_s=5.0))
    seqs = speculating(speculator, 16)
    for t in range(10):
        feed(speculator, seqs, 0, 0.010, 0.001, now=1.0 + t * 0.1)
        feed(speculator, seqs, 4, 0.040, 0.010, now=1.05 + t * 0.1, accepted=1)
    feed(speculator, seqs, 0, 0.010, 0.001, now=8.0)  # 7 s since it last verified proposals here
    speculator.before_schedule(seqs, 16)
    assert speculator.gamma > 0
    for seq in seqs:
        speculator.after_tokens(seq, 8.0, 16, room=10)  # the exploring round is asked
    assert all(seq.spec.waiting or seq.spec.proposal for seq in seqs)
    for _ in range(3):  # planned again while it is under way
        speculator.before_schedule(seqs, 16)
        assert all(seq.spec.waiting or seq.spec.proposal for seq in seqs)
    feed(speculator, seqs, 4, 0.040, 0.010, now=8.1, accepted=1)  # the round: it still does not pay
    for seq in seqs:
        seq.spec.drop_round()
    for now, explores in ((9.0, False), (14.0, False), (18.2, True)):  # the next waits twice as long, not more
        feed(speculator, seqs, 0, 0.010, 0.001, now=now)
        speculator.before_schedule(seqs, 16)
        assert (speculator.gamma > 0) is explores, now


def test_a_static_disable_by_batch_size_overrides_the_cost_model():
    speculator = Speculator(SpeculationSettings(disable_by_batch_size=64))
    assert not speculator.uses_cost_model
    seqs = speculating(speculator, 16)
    for t in range(10):
        feed(speculator, seqs, 4, 0.040, 0.010, now=1.0 + t, accepted=2)
    speculator.before_schedule(seqs, 16)
    speculator.after_tokens(seqs[0], 11.0, 16, room=10)
    assert seqs[0].spec.proposer.rounds  # the static rule speculates up to 64


def test_gaps_are_kept_apart_by_proposer_kind():
    costs = StepCosts()
    costs.observe(1, 0, 0.010, 0.001, now=1.0)
    costs.observe(1, 4, 0.012, 0.020, now=2.0, kind="draft_model")
    costs.observe(1, 4, 0.012, 0.002, now=3.0, kind="ngram")
    assert costs.period(1, 4, "draft_model") == pytest.approx(0.032)
    assert costs.period(1, 4, "ngram") == pytest.approx(0.014)
    assert costs.period(1, 0, "ngram") == costs.period(1, 0, "draft_model") == pytest.approx(0.011)


def test_sequences_whose_proposals_come_late_gain_nothing_and_can_turn_speculation_off():
    # 32 rows, acceptance 0.74, each proposed token adds 40 ms to a 91 ms decode step.
    periods = [0.091 + 0.040 * g for g in range(9)]
    alphas = [0.74] * 32
    assert choose_gamma(one(alphas), 0, periods) > 0  # every row verified: speculation looks like a win
    half = [1.0] + [0.5] * 8
    # Half verified, the other half decoding one token without a proposal: it does not pay.
    assert choose_gamma(one(alphas, ready=half), 0, periods) == 0
    # Half verified, half sitting the step out (no token at all): it pays even less.
    none = [0.0] * 9
    assert goodput(one(alphas, half, half), 0, 2, periods[2]) < goodput(one(alphas, half, none), 0, 2, periods[2])
    assert goodput(one(alphas, none), 0, 4, 0.18) == pytest.approx(32 / 0.18)  # none in: one token a row
    assert goodput(one(alphas, none, [1.0] * 9), 0, 4, 0.18) == 0.0  # all out: nothing
    assert goodput(one(alphas, none, [1.0] * 9), 0, 0, 0.09) == goodput(one(alphas), 0, 0, 0.09)  # gamma 0 waits for none


def test_a_lookups_misses_are_not_charged_to_the_draft_models_sequences():
    # Two sequences on a draft model (accepted at 0.75, always verified) beside two fallen back to n-gram
    # lookup (0.3, and found something in 20 % of the steps); each proposed token per row adds 33 % to a step.
    periods = [10.0 + 3.3 * g for g in range(9)]
    draft = Speculating([0.75, 0.75], [1.0] * 9, [0.0] * 9)
    lookup = Speculating([0.3, 0.3], [1.0] + [0.2] * 8, [0.0] * 9)
    assert choose_gamma([draft, lookup], 0, periods) == 1
    # One fraction for the batch (0.6 verified) would have charged the lookup's misses to the draft's
    # sequences too, and turned speculation off for all four.
    pooled = [1.0] + [0.6] * 8
    assert choose_gamma([Speculating([0.75, 0.75, 0.3, 0.3], pooled, [0.0] * 9)], 0, periods) == 0


def test_the_speculator_measures_readiness_per_proposal_method():
    speculator = Speculator()
    seqs = speculating(speculator, 4)
    for s in seqs[2:]:
        s.spec.stats.method = "ngram"  # fallen back to lookups (that will find nothing)
    speculator.after_forward([Row(seqs[0], 0, 3)], 0.0, 0.5)
    speculator.before_schedule(seqs, 4)
    assert speculator.gamma > 0  # nothing measured at 4 yet: it tries
    speculator.after_forward([Row(s, 0, 1, [1] * 4 if s in seqs[:2] else []) for s in seqs], 0.02, 0.6)
    ready, out = speculator.costs.readiness(4, 4, "draft_model")
    assert ready[4] == 1.0 and out[4] == 0.0
    ready, out = speculator.costs.readiness(4, 4, "ngram")
    assert ready[4] == 0.0 and out[4] == 0.0


def test_step_costs_keep_the_measured_readiness_per_gamma():
    costs = StepCosts()
    assert costs.readiness(32, 3) == ([1.0] * 4, [0.0] * 4)  # nothing measured: every proposal counts as in time
    costs.observe_readiness(32, 4, "draft_model", ready=0.5, sat_out=0.25)
    costs.observe_readiness(32, 2, "draft_model", ready=0.9, sat_out=0.0)
    # gamma 1 and 2 take gamma 2's, 3 (a tie) the smaller's, 4 and up gamma 4's; other kinds know nothing.
    ready, out = costs.readiness(32, 5, "draft_model")
    assert ready == [1.0, 0.9, 0.9, 0.9, 0.5, 0.5] and out == [0.0, 0.0, 0.0, 0.0, 0.25, 0.25]
    assert costs.readiness(32, 2, "ngram") == ([1.0] * 3, [0.0] * 3)
    assert costs.table()[32]["ready"] == {"draft_model:2": 0.9, "draft_model:4": 0.5}


class SilentProposer(InstantProposer):
    """A draft that has not answered yet: the round stays under way."""

    def propose(self, round_, on_result):
        self.rounds.append(round_.gamma)


def test_the_speculator_counts_the_sequences_that_sat_a_step_out_waiting_for_their_drafts():
    speculator = Speculator(SpeculationSettings(explore_s=0.0))  # measuring: a round at every decision
    seqs = speculating(speculator, 32)
    for t in range(3):  # plain steps of 91 ms, no speculation decided
        feed(speculator, seqs, 0, 0.091, 0.0, now=0.1 + t * 0.1)
    for t in range(10):
        speculator.after_forward([Row(seqs[0], 0, 3)], 0.0, 0.5 + t)
        speculator.before_schedule(seqs, 32)
        speculator.after_forward([Row(s, 0, 1) for s in seqs], 0.2, 0.6 + t)  # no round under way yet
        # The scheduler leaves out the half whose drafts are still working: they emit nothing this step.
        for s in seqs[1::2]:
            s.spec.waiting = True
        speculator.before_schedule(seqs, 32)
        assert speculator.gamma > 0
        speculator.after_forward([Row(s, 0, 1, [1] * 4) for s in seqs[::2]], 0.18, 0.86 + t)  # after an 80 ms wait
        for s in seqs:
            s.spec.waiting = False
            s.spec.control.update(3, 4)
    costs = speculator.costs
    ready, out = costs.readiness(32, 4, "draft_model")
    assert ready[4] == pytest.approx(0.5) and out[4] == pytest.approx(0.5)  # the plain steps left no mark
    # The 16-row step is the cost of 32 running; the steps decided to speculate in which no proposal was in
    # yet (91 ms here, 200 below) are not plain steps, and do not move the plain cost.
    assert costs.table()[32]["forward_ms"] == {1: 91.0, 5: 180.0}
    speculator.settings.explore_s = 60.0
    speculator.before_schedule(seqs, 32)
    assert speculator.gamma == 0
    # Had every sequence been verified, the same costs and acceptance would have paid.
    periods = costs.periods(32, 8, "draft_model")
    assert choose_gamma(one([speculator._alpha(s.spec) for s in seqs]), 0, periods) > 0


def verified_step(speculator, seqs, forward_s, now, accepted, gamma=4):
    """A decode step in which every one of ``seqs`` verifies its proposal of ``gamma``, keeping ``accepted``."""
    rows = [Row(s, 0, 1, [1] * gamma) for s in seqs]
    for s in seqs:
        s.spec.sync.next_round(s.tokens, gamma)
    speculator.after_forward(rows, forward_s, now)
    for s, row in zip(seqs, rows):
        logits = torch.zeros(gamma + 1, 8)
        logits[:, 1] = 1.0  # the target agrees with the proposals...
        logits[accepted, 1], logits[accepted, 2] = 0.0, 1.0  # ...up to `accepted`
        speculator.after_verify(s, row, logits)


def plain_measured(speculator, n=32):
    """``n`` speculating sequences after ten plain steps of 0.1 s (10 tokens a second per sequence), and
    the time the last one ended (a step that starts then has no gap)."""
    seqs = speculating(speculator, n)
    for t in range(10):
        feed(speculator, seqs, 0, 0.100, 0.0, now=1.0 + t * 0.01)
    return seqs, 1.09


def assert_stands_down_where_the_model_would_go_on(speculator, seqs, kind):
    """The next decision does not speculate, though the model alone, at the same costs and acceptance, would."""
    speculator.before_schedule(seqs, 32)
    assert speculator.gamma == 0
    periods = speculator.costs.periods(32, 8, kind)
    assert choose_gamma(one([speculator._alpha(s.spec) for s in seqs]), 0, periods) > 0


def losing_until_it_stands_down(speculator, seqs, now, rows=6, limit=40):
    """Steps in which only ``rows`` of the 32 sequences get a row, every proposal kept: 7.8 tokens a second
    per sequence against a plain step's 10. Returns the gammas chosen, in order, until the first 0, and the
    time then."""
    chosen = []
    for _ in range(limit):
        speculator.before_schedule(seqs, 32)
        if not speculator.gamma:
            return chosen, now
        chosen.append(speculator.gamma)
        now += 0.12
        verified_step(speculator, seqs[:rows], 0.120, now, accepted=4)
    raise AssertionError(f"still speculating after {limit} losing steps: {chosen}")


def test_speculation_that_delivered_less_than_plain_steps_stands_down_whatever_the_model_expects():
    speculator = Speculator(SpeculationSettings(explore_s=60.0))
    seqs, now = plain_measured(speculator)
    # A verify of 5 tokens a row costs 1.2x a decode step and every proposal is kept: the model expects
    # 5 tokens a row. But only 6 of the 32 sequences get a row (a cost the model does not see: the
    # others neither verified nor waited for a draft): 30 tokens in 0.12 s, 7.8 a second per sequence.
    chosen, now = losing_until_it_stands_down(speculator, seqs, now)
    # Each gamma measured to lose (3 steps counted, after the first) caps the next at half of it.
    tried = list(dict.fromkeys(chosen))
    assert tried[0] == 8 and all(b <= a // 2 for a, b in zip(tried, tried[1:])) and tried[-1] == 1, chosen
    assert len(chosen) <= 4 * len(tried)
    assert speculator.costs.realized(32, "draft_model", 8, now, 60.0) == pytest.approx(30 / 32 / 0.12)
    assert speculator.costs.table()[32]["realized_tokens_per_s"]["draft_model:8"] == pytest.approx(7.812, abs=0.001)
    assert speculator.costs.realized(32, "ngram", 8, now, 60.0) is None  # kept per proposer kind
    assert_stands_down_where_the_model_would_go_on(speculator, seqs, "draft_model")


def test_a_long_gamma_that_lost_gives_way_to_a_shorter_one_that_pays():
    # Acceptance that is not geometric: the first 2 proposals of a round are kept, never a third. The
    # estimate (2 successes, 1 failure a round) expects long rounds to pay; rounds of 8 emit 3 tokens in
    # a step of 0.2 s (15 a second, more than a plain step's 10); rounds of 2 emit 3 in 0.11 s (27 a second).
    speculator = Speculator(SpeculationSettings(explore_s=60.0))
    seqs, now = plain_measured(speculator)
    step_s = {g: 0.1 + 0.0125 * g for g in range(9)}
    chosen = []
    for _ in range(30):
        speculator.before_schedule(seqs, 32)
        gamma = speculator.gamma
        chosen.append(gamma)
        now += step_s[gamma] * (2.5 if gamma > 4 else 1.0)  # what the model does not see: long rounds cost more
        verified_step(speculator, seqs, step_s[gamma], now, accepted=min(2, gamma), gamma=gamma)
    assert chosen[0] == 8 and chosen[-1] in (1, 2, 3, 4) and 0 not in chosen, chosen


def test_speculation_that_delivered_more_than_plain_steps_goes_on():
    speculator = Speculator(SpeculationSettings(explore_s=60.0))
    seqs, now = plain_measured(speculator)
    for _ in range(8):  # every sequence verified, 2 of 4 proposals kept: 3 tokens a row in 0.2 s, 15 a second
        speculator.before_schedule(seqs, 32)
        gamma = speculator.gamma
        now += 0.2
        verified_step(speculator, seqs, 0.200, now, accepted=2)
    speculator.before_schedule(seqs, 32)
    assert speculator.costs.realized(32, "draft_model", gamma, now, 60.0) == pytest.approx(15.0)
    assert speculator.gamma > 0


def test_periods_follow_every_new_measurement():
    costs = StepCosts()
    costs.observe(8, 0, 0.010, 0.001, now=1.0)
    first = costs.periods(8, 2)
    assert costs.periods(8, 2) == first == [pytest.approx(0.011)] * 3
    costs.observe(8, 2, 0.016, 0.001, now=2.0)  # a verify of 3 tokens a row: 16 ms
    assert costs.periods(8, 2)[2] == pytest.approx(0.017)
    assert costs.periods(8, 2)[0] == pytest.approx(0.011)


class Lookup(InstantProposer):
    kind = "ngram"


def test_lookups_that_found_nothing_are_not_counted_and_ones_that_lost_stand_down():
    speculator = Speculator(SpeculationSettings(explore_s=60.0))
    seqs, now = plain_measured(speculator)
    for s in seqs:
        s.spec.proposer = Lookup()
        s.spec.stats.method = "ngram"
    for _ in range(6):  # the lookups find nothing: plain rows, nothing to count
        speculator.before_schedule(seqs, 32)
        assert speculator.gamma > 0
        now += 0.1
        speculator.after_forward([Row(s, 0, 1) for s in seqs], 0.1, now)
    speculator.before_schedule(seqs, 32)
    gamma = speculator.gamma
    assert gamma > 0 and speculator.costs.realized(32, "ngram", gamma, now, 60.0) is None
    # 6 of them find proposals, all kept; the others get no row (what the model misses)
    chosen, now = losing_until_it_stands_down(speculator, seqs, now)
    assert chosen[0] == gamma
    assert speculator.costs.realized(32, "ngram", gamma, now, 60.0) == pytest.approx(30 / 32 / 0.12)
    assert_stands_down_where_the_model_would_go_on(speculator, seqs, "ngram")


def test_a_loss_is_measured_again_after_explore_s_and_each_one_confirmed_doubles_the_wait():
    speculator = Speculator(SpeculationSettings(explore_s=5.0))
    seqs, now = plain_measured(speculator)

    def losing_steps():
        nonlocal now
        _, now = losing_until_it_stands_down(speculator, seqs, now)

    def plain_until(t):
        nonlocal now
        while now < t:
            now += 0.1
            feed(speculator, seqs, 0, 0.100, 0.0, now=now)
            speculator.before_schedule(seqs, 32)
            if speculator.gamma:
                return now
        return None

    losing_steps()
    assert speculator.gamma == 0
    started = now
    resumed = plain_until(started + 20)
    assert resumed is not None and 5.0 <= resumed - started < 5.5  # measured again after explore_s
    losing_steps()
    assert speculator.gamma == 0
    started = now
    resumed = plain_until(started + 20)
    assert resumed is not None and 10.0 <= resumed - started < 10.5  # a second loss: twice as long


def test_a_warming_up_average_weighs_its_first_samples_alike():
    from services.speculative.cost_model import Ewma

    plain, warm = Ewma(), Ewma(warm_up=True)
    for x in (10.0, 1.0, 1.0):
        plain.add(x)
        warm.add(x)
    assert warm.value == pytest.approx(4.0)  # the mean of the three
    assert plain.value == pytest.approx(10 * 0.64 + 0.16 + 0.2)  # the first sample still weighs most


def test_one_slow_step_moves_a_step_cost_by_at_most_its_clip():
    from services.speculative.cost_model import STEP_COST_CLIP, Ewma

    cost = Ewma(clip=STEP_COST_CLIP)
    for x in (0.070, 0.070, 0.400):  # a step that waited for drafts, or a collection pause
        cost.add(x)
    assert cost.value == pytest.approx(0.070 * (1 + cost.weight * (STEP_COST_CLIP - 1)))
    for _ in range(10):  # a lasting change is followed all the same
        cost.add(0.140)
    assert cost.value == pytest.approx(0.140, rel=0.1)


def test_steps_that_waited_for_drafts_or_ran_beside_them_are_not_plain_steps():
    """2026-12-01, 32 streams: a step decided to speculate whose proposals were not in (it waited up to
    draft_hold_ms), and the plain steps after standing down while the draft still computed the rounds asked
    before (on the same cores), were filed as plain steps; they lifted the plain period from 70 to 96 ms,
    so speculation was judged to pay where it lost 14 %."""
    speculator = Speculator(SpeculationSettings(explore_s=60.0))
    seqs, now = plain_measured(speculator)  # plain steps of 0.1 s
    held = []
    for s in seqs:  # drafts that answer when the test says
        s.spec.proposer = HeldProposer(held)
    speculator.before_schedule(seqs, 32)
    assert speculator.gamma > 0
    now += 0.15
    speculator.after_forward([Row(s, 0, 1) for s in seqs], 0.1, now)  # no proposal was in: a 50 ms wait
    for s in seqs:
        speculator.after_tokens(s, now, 32, room=10)  # rounds asked; the draft computes them
    assert len(held) == 32
    speculator.settings.disable_by_batch_size = 16  # the batch stands down (here by the static rule)
    for _ in range(2):  # beside the draft still computing the dropped rounds
        speculator.before_schedule(seqs, 32)
        assert not any(s.spec.waiting for s in seqs)
        now += 0.13
        speculator.after_forward([Row(s, 0, 1) for s in seqs], 0.13, now)
    assert speculator.costs.period(32, 0) == pytest.approx(0.100)
    for answer in held:  # the late answers come in (and are ignored): the draft is done
        answer(Proposal([1, 1]), None)
    speculator.before_schedule(seqs, 32)
    now += 0.09
    speculator.after_forward([Row(s, 0, 1) for s in seqs], 0.09, now)  # a plain step again: measured
    assert speculator.costs.period(32, 0) == pytest.approx(0.098)


class HeldProposer(InstantProposer):
    """A draft whose answers wait in ``held`` until the test gives them."""

    def __init__(self, held):
        super().__init__()
        self.held = held

    def propose(self, round_, on_result):
        self.rounds.append(round_.gamma)
        self.held.append(on_result)


def decided_step(speculator, seqs, now, chosen, verify_s, plain_s):
    """One step as the speculator decides it (its gamma appended to ``chosen``): every proposal kept in
    ``verify_s`` seconds, or a plain step of ``plain_s``; the time it ended."""
    speculator.before_schedule(seqs, len(seqs))
    chosen.append(speculator.gamma)
    if speculator.gamma:
        verified_step(speculator, seqs, verify_s, now + verify_s, accepted=speculator.gamma, gamma=speculator.gamma)
        return now + verify_s
    speculator.after_forward([Row(s, 0, 1) for s in seqs], plain_s, now + plain_s)
    return now + plain_s


def test_plain_steps_are_measured_again_after_speculating_for_the_wait():
    """Speculation is judged against plain steps; after speculating for ``explore_s``, the batch takes plain
    steps until one is measured (none while a draft still computes), then speculates again."""
    speculator = Speculator(SpeculationSettings(explore_s=5.0))
    seqs, now = plain_measured(speculator)
    chosen = []
    while now < 8.0:
        now = decided_step(speculator, seqs, now, chosen, verify_s=0.2, plain_s=0.1)
    plain = [i for i, g in enumerate(chosen) if g == 0]
    assert plain == [plain[0]], chosen  # one plain step (no draft was computing beside it), once
    assert chosen[plain[-1] + 1] > 0
    assert speculator.costs.plain_at(32) > 5.0


def test_a_sequence_is_priced_once_a_round_while_the_batch_stays_in_its_bucket(monkeypatch):
    """Streams end and begin at most steps of a served load (31, 32, 31 running...); the review's price
    is the bucket's, so it is not computed again for every sequence at every such step (1.25 ms a step
    at 32 sequences, ``benchmarks/speculator_step.py``)."""
    speculator = Speculator(SpeculationSettings(explore_s=60.0))
    seqs, now = plain_measured(speculator)
    for s in seqs:
        s.spec.fallback = InstantProposer  # a request that may fall back: its review is priced
    verified_step(speculator, seqs, 0.4, now + 0.4, accepted=2)  # a round each: something to review
    priced = []
    real = speculator._prospect
    monkeypatch.setattr(speculator, "_prospect", lambda *a: priced.append(a) or real(*a))
    for i in range(6):
        running = seqs if i % 2 else seqs[:31]
        speculator.before_schedule(running, len(running))
        for s in running:
            speculator.after_tokens(s, now, len(running), room=10)
    assert 0 < len(priced) <= 2 * len(seqs)  # each sequence once (its method and the fallback's)


def test_a_loss_measured_at_one_gamma_does_not_overrule_a_gain_measured_at_another():
    """2026-12-01, 2 streams: gamma 7 was measured to deliver 1.75x a plain step; unlucky steps at 5, 3,
    2 and 1 then walked the batch down to no speculation for the rest of the run (0.93 of plain there,
    against 1.38 on the runs that kept speculating)."""
    from services.speculative.cost_model import gate

    speculating, periods = one([0.6, 0.6]), [0.0209] + [0.025 + 0.003 * g for g in range(1, 9)]
    plain_rate = 1 / periods[0]
    model = choose_gamma(speculating, 0, periods)
    assert model > 0
    assert gate(model, speculating, 0, periods, {}) == model  # nothing measured: the model decides
    lost = {1: 0.7 * plain_rate, 2: 0.8 * plain_rate, 3: 0.9 * plain_rate, 5: 0.7 * plain_rate}
    assert gate(model, speculating, 0, periods, lost) == 0  # the shortest lost: none left to try
    assert gate(model, speculating, 0, periods, {**lost, 7: 1.75 * plain_rate}) == 7  # measured to pay
    # A loss at 4 leaves 1-2 to the model; a gain measured at 8 that beats the model's expectation wins.
    expected = {g: goodput(speculating, 0, g, periods[g]) / 2 for g in (1, 2)}
    assert gate(model, speculating, 0, periods, {4: 0.9 * plain_rate}) in (1, 2)
    assert gate(model, speculating, 0, periods, {4: 0.9 * plain_rate, 8: 1.01 * max(expected.values())}) == 8
    assert gate(model, speculating, 0, periods, {4: 0.9 * plain_rate, 8: 0.99 * min(expected.values())}) in (1, 2)


def test_a_gamma_is_judged_on_enough_sequence_steps():
    from services.speculative.cost_model import REALIZED_MIN_STEPS, realized_min_steps

    assert realized_min_steps(32) == realized_min_steps(6) == REALIZED_MIN_STEPS
    assert realized_min_steps(2) == 8 and realized_min_steps(1) == 16


def test_a_bucket_that_began_by_exploring_measures_a_plain_step_before_the_model_decides():
    """A batch size met first while speculating explores (its costs unmeasured), and no step it speculated
    in is a plain one; without a plain step measured, period(0) would be the verify widths' forward with
    no gap, and speculation would be judged against a step nobody timed. (It explores until a step of a
    shape it ran before is timed: the first of each shape is not a cost.)"""
    speculator = Speculator(SpeculationSettings(explore_s=60.0))
    seqs = speculating(speculator, 4)
    now, chosen = 1.0, []
    for _ in range(12):
        now = decided_step(speculator, seqs, now, chosen, verify_s=0.03, plain_s=0.02)
    assert chosen[0] > 0 and 0 in chosen[1:], chosen  # explored, then a plain step
    assert speculator.costs.plain_at(4) is not None
    assert speculator.costs.period(4, 0) == pytest.approx(0.02)
    assert chosen[-1] > 0  # measured: every proposal kept at 1.5x a plain step's cost pays


def test_the_first_forward_of_a_shape_is_not_a_step_cost():
    """oneDNN and MKL set up their kernels the first time a product of a new row count runs (2026-12-02, a
    2-stream sweep: the first 2-row gamma-8 verify of target-large took 750 ms, the model then priced gamma 8
    at 15 plain steps and never chose it again to see it was wrong). That step is not what the shape costs,
    nor what speculating delivers: the next one of the same shape is."""
    speculator = Speculator(SpeculationSettings())
    seqs = speculating(speculator, 2)
    feed(speculator, seqs, 8, forward_s=0.75, gap_s=0.001, now=1.0)
    assert speculator.costs.table().get(2, {}).get("forward_ms", {}) == {}
    feed(speculator, seqs, 8, forward_s=0.05, gap_s=0.001, now=2.0)
    assert speculator.costs.table()[2]["forward_ms"] == {9: 50.0}
    # A shape is a shape whatever the step: the 2-row plain step is new, the next one is timed.
    for now in (3.0, 4.0):
        speculator.before_schedule(seqs, 2)
        speculator.after_forward([Row(s, 0, 1) for s in seqs], 0.02, now)
    assert speculator.costs.table()[2]["forward_ms"] == {1: 20.0, 9: 50.0}


def test_a_new_widths_first_forward_counts_as_at_most_the_clip_times_the_line():
    """A too-high first estimate is never corrected (the model stops choosing that gamma); a too-low one is
    measured at the next step and moves up by the clip at each."""
    costs = StepCosts()
    costs.observe(2, 0, forward_s=0.025, gap_s=0.001, now=1.0)
    costs.observe(2, 8, forward_s=0.750, gap_s=0.001, now=2.0, kind="draft_model")  # one stalled step
    assert costs.table()[2]["forward_ms"] == {1: 25.0, 9: 75.0}
    for now in (3.0, 4.0, 5.0):
        costs.observe(2, 8, forward_s=0.600, gap_s=0.001, now=now, kind="draft_model")  # it really is slow
    assert costs.table()[2]["forward_ms"][9] > 200.0
