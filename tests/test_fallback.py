"""The draft model → n-gram fallback: the pure decision, the Speculator's switch, the local lookup proposer."""

from __future__ import annotations

import re

import pytest

from services.engine.sequence import GenerationRequest, SamplingOptions, Sequence, Status
from services.speculative.cost_model import Speculating, choose_gamma
from services.speculative.fallback import Action, Fallback, MethodRecord, Prospect, review
from services.speculative.gamma import SpeculationSettings
from services.speculative.ngram import LocalNgramProposer, NgramLookup
from services.speculative.speculator import Speculator
from services.speculative.state import Proposal, SpeculationRequest
from services.speculative.sync import DraftSync, Round

#: Measured step seconds per gamma 0..4: a verify costs a little more than a plain step.
CHEAP = [0.010, 0.011, 0.012, 0.013, 0.014]
#: A verify costing 6x a plain step: even full acceptance (5 tokens) does not pay.
DEAR = [0.010, 0.060, 0.060, 0.060, 0.060]


def test_nothing_is_decided_before_a_round_is_verified():
    assert review(MethodRecord(0, 0.0, 0.0), 0, 0.25, 4, True, Prospect(0.0, CHEAP), Prospect(0.9, CHEAP)) \
        == (Action.KEEP, "")


def test_below_the_acceptance_floor_it_falls_back_or_stops_when_it_cannot():
    record = MethodRecord(rounds=4, alpha=0.1, ema=0.2)
    action, reason = review(record, 0, 0.25, 4, can_fall_back=True)
    assert action is Action.FALL_BACK and reason == "acceptance 0.2 (moving average of its last rounds) below 0.25"
    assert review(record, 0, 0.25, 4, can_fall_back=False)[0] is Action.STOP
    # Not before min_rounds rounds.
    assert review(MethodRecord(3, 0.1, 0.2), 0, 0.25, 4, True)[0] is Action.KEEP


def test_it_falls_back_where_the_cost_model_would_not_speculate_at_its_acceptance_and_would_with_the_lookup():
    # One round, nearly nothing accepted: at these costs gamma 0 beats any gamma at alpha 0.01, and a lookup
    # accepted at 0.5 would pay. (Not min_rounds: a batch that stops speculating for this request's acceptance
    # would give it no more rounds.)
    action, reason = review(MethodRecord(1, 0.01, 0.7), 0, 0.25, 4, True, Prospect(0.01, CHEAP), Prospect(0.5, CHEAP))
    assert action is Action.FALL_BACK and "cost model" in reason and "with 1 sequence running" in reason
    assert "n-gram lookup (estimated acceptance 0.50)" in reason
    # The same costs pay at a good acceptance: keep the draft.
    assert review(MethodRecord(1, 0.8, 0.9), 0, 0.25, 4, True, Prospect(0.8, CHEAP), Prospect(0.5, CHEAP))[0] \
        is Action.KEEP
    # When even full acceptance would not pay with either method (a big batch, a dear verify) the
    # acceptance is not to blame: the batch's gamma leaves speculation out, the method stays.
    assert review(MethodRecord(1, 0.01, 0.7), 15, 0.25, 4, True, Prospect(0.01, DEAR), Prospect(1.0, DEAR))[0] \
        is Action.KEEP
    # A draft that costs too much even at full acceptance, where a lookup (no draft wait) would pay: try it.
    assert review(MethodRecord(1, 0.9, 0.9), 0, 0.25, 4, True, Prospect(0.9, DEAR), Prospect(0.5, CHEAP))[0] \
        is Action.FALL_BACK
    # After the fallback (or when the request pinned its method) a cost-model "no" is the batch's business.
    assert review(MethodRecord(1, 0.01, 0.7), 0, 0.25, 4, False, Prospect(0.01, CHEAP), Prospect(0.5, CHEAP))[0] \
        is Action.KEEP
    # No cost model (a static disable_by_batch_size) or nothing measured here: only the floor decides.
    assert review(MethodRecord(1, 0.01, 0.7), 0, 0.25, 4, True)[0] is Action.KEEP


def test_a_lookup_measured_not_to_pay_here_is_not_where_a_draft_that_does_not_pay_goes():
    # Measured at 4 streams on 2 cores (2026-12-01): a verify of 1 proposal costs 1.54x a plain step.
    periods = [0.025, 0.0385, 0.0438, 0.0491, 0.0713, 0.0589, 0.0649, 0.0702, 0.0675]
    lookup_periods = [0.025, 0.0331, 0.0366, 0.0402, 0.0537, 0.0460, 0.0508, 0.0543, 0.0536]
    record = MethodRecord(3, 0.45, 0.5)
    draft = Prospect(0.45, periods)
    assert not draft.pays()
    # A lookup accepted at 0.2 that found something in 40 % of its rounds pays no better: keep the draft.
    seldom = [1.0] + [0.4] * 8
    assert not Prospect(0.2, lookup_periods, seldom).pays()
    assert review(record, 3, 0.25, 4, True, draft, Prospect(0.2, lookup_periods, seldom))[0] is Action.KEEP
    # The same lookup on text it finds and gets right (a copy-heavy workload) is worth the switch.
    assert review(record, 3, 0.25, 4, True, draft, Prospect(0.8, lookup_periods))[0] is Action.FALL_BACK


class ScriptedProposer:
    """A draft-model proposer whose answers the test gives: ``answer`` (tokens
    proposed each round) or ``error``; it answers at once."""

    kind = "draft_model"

    def __init__(self, answer=lambda gamma: [1] * gamma, error=None):
        self.answer, self.error = answer, error
        self.rounds: list[Round] = []
        self.closed = False

    def propose(self, round_, on_result):
        self.rounds.append(round_)
        if self.error is not None:
            on_result(None, self.error)
        else:
            on_result(Proposal(self.answer(round_.gamma)), None)

    def close(self):
        self.closed = True


def sequence(speculator, prompt, proposer, fallback=LocalNgramProposer):
    request = GenerationRequest(prompt_ids=list(prompt), sampling=SamplingOptions(max_new_tokens=64))
    seq = Sequence(request=request, sink=lambda ev: None, arrival=0.0)
    seq.tokens = list(prompt)
    seq.status = Status.RUNNING
    seq.spec = speculator.open(SpeculationRequest(proposer, fallback=fallback), post=lambda fn: fn(0.0))
    return seq


def static_speculator():
    """No cost model (a static override): only the acceptance floor and failures decide."""
    return Speculator(SpeculationSettings(disable_by_batch_size=64, min_acceptance=0.25, min_rounds=4))


def test_a_failed_draft_hands_the_sequence_to_the_lookup_with_the_whole_sequence():
    speculator = static_speculator()
    draft = ScriptedProposer(error=ConnectionError("connection refused"))
    seq = sequence(speculator, [5, 6, 7, 5, 6], draft)
    speculator.after_tokens(seq, 1.0, 1, room=10)
    spec = seq.spec
    assert draft.closed and isinstance(spec.proposer, LocalNgramProposer)
    assert spec.stats.method == "ngram" and spec.stats.fallback == Fallback.DRAFT_FAILED.value
    assert "draft unavailable: connection refused" in spec.stats.fallback_reason and spec.active
    # The next round goes to the lookup, from scratch: [5, 6] occurred before, followed by 7.
    speculator.after_tokens(seq, 1.1, 1, room=10)
    assert spec.take_proposal() == [7, 5, 6]


def test_a_draft_with_low_acceptance_is_replaced_by_the_lookup_once():
    speculator = static_speculator()
    seq = sequence(speculator, [9, 8, 7, 9, 8], ScriptedProposer())
    spec = seq.spec
    for _ in range(4):  # four rounds with nothing accepted: the floor (0.25) is crossed
        spec.control.update(0, 4)
    speculator.after_tokens(seq, 1.0, 1, room=10)
    assert spec.stats.method == "ngram" and spec.stats.fallback == Fallback.LOW_ACCEPTANCE.value
    assert re.match(r"acceptance 0\.24\d* \(moving average of its last rounds\) below 0\.25", spec.stats.fallback_reason)
    assert spec.control.rounds == 0 and spec.fallback is None  # the lookup's acceptance is its own
    assert spec.take_proposal() == [7, 9, 8]
    for _ in range(4):  # the lookup does no better: no third method, speculation stops
        spec.control.update(0, 3)
    speculator.after_tokens(seq, 1.1, 1, room=10)
    assert not spec.active and spec.stats.disabled_reason.startswith("acceptance")
    assert spec.stats.method == "ngram"


def test_a_pinned_method_is_never_replaced():
    speculator = static_speculator()
    seq = sequence(speculator, [1, 2, 3], ScriptedProposer(error=ConnectionError("gone")), fallback=None)
    speculator.after_tokens(seq, 1.0, 1, room=10)
    assert not seq.spec.active and seq.spec.stats.fallback == "" and seq.spec.stats.method == "draft_model"


def test_a_late_answer_of_the_replaced_draft_is_ignored():
    speculator = static_speculator()
    answers = []
    draft = ScriptedProposer()
    draft.propose = lambda round_, on_result: answers.append(on_result)  # answers later
    seq = sequence(speculator, [4, 4, 4, 4], draft)
    speculator.after_tokens(seq, 1.0, 1, room=10)
    speculator._fall_back(seq.spec, Fallback.DRAFT_FAILED, "test")
    answers[0](Proposal([1, 1, 1, 1]), None)
    assert seq.spec.proposal is None and not seq.spec.waiting


def test_a_request_without_a_draft_proposes_by_lookup_from_its_first_round():
    speculator = static_speculator()
    seq = sequence(speculator, [3, 1, 4, 1, 5, 3, 1], None)
    assert seq.spec.stats.method == "ngram" and seq.spec.stats.fallback == Fallback.NO_DRAFT.value
    speculator.after_tokens(seq, 1.0, 1, room=10)
    assert seq.spec.take_proposal() == [4, 1, 5, 3]  # gamma 4, the request's


def test_the_lookup_follows_the_sync_protocol_like_a_draft():
    target, lookup = DraftSync(), NgramLookup()
    tokens = [1, 2, 3, 1, 2]
    assert lookup.round(target.next_round(tokens, 3)) == [3, 1, 2]
    # The target kept one proposal (3) and then took its own token 9.
    target.accepted(1)
    tokens += [3, 9]
    # The lookup rolls back its two unkept proposals and holds the target's sequence.
    assert lookup.round(target.next_round(tokens, 2)) == []  # [3, 9] never occurred before
    assert lookup._tokens == tokens
    with pytest.raises(Exception, match="discard"):
        lookup.round(Round(discard=5, append=[1], gamma=1))


def test_a_request_is_priced_as_a_batch_of_its_like_not_as_the_one_row_that_speculates():
    # Measured at 4 streams on 2 cores: each proposed token per row adds 9 ms to a 41 ms step.
    periods = [0.041 + 0.009 * g for g in range(9)]
    record = MethodRecord(5, 0.6, 0.5)
    lookup = Prospect(0.9, periods)
    # Four sequences at 0.6 make speculation pay, so this one keeps its draft (the batch speculates with it)...
    assert review(record, 3, 0.25, 4, True, Prospect(0.6, periods), lookup)[0] is Action.KEEP
    # ... where pricing it as one speculating row beside three plain ones would have sent it to ngram.
    assert choose_gamma([Speculating([0.6])], 3, periods) == 0
    # A draft that is rarely right is still left: a batch of its like would not speculate.
    assert review(MethodRecord(5, 0.1, 0.3), 3, 0.25, 4, True, Prospect(0.1, periods), lookup)[0] is Action.FALL_BACK
    # And what the steps found counts: with half the sequences sitting every step out, 0.6 no longer pays.
    half = [1.0] + [0.5] * 8
    assert review(record, 3, 0.25, 4, True, Prospect(0.6, periods, half, half), lookup)[0] is Action.FALL_BACK
