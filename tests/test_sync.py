"""The target/draft sync protocol (services.speculative.sync) on its own: pure Python."""

from __future__ import annotations

import random

import pytest

from services.common.errors import InvalidArgument
from services.common.validation import MAX_GAMMA
from services.speculative.sync import DraftSync, Round


def test_first_round_carries_the_context_and_discards_nothing():
    target = DraftSync()
    assert target.next_round([5, 6, 7], 4) == Round(0, [5, 6, 7], 4)
    assert (target.synced, target.asked, target.kept) == (3, 4, 0)


def test_a_verified_round_discards_the_rejected_tail_and_appends_the_targets_token():
    target = DraftSync()
    tokens = [5, 6, 7]
    target.next_round(tokens, 4)
    target.accepted(2)  # kept 2 of 4 proposals, then the target's own token 99
    tokens += [11, 12, 99]
    assert target.next_round(tokens, 3) == Round(2, [99], 3)


def test_a_round_never_verified_is_discarded_whole():
    target = DraftSync()
    tokens = [5, 6, 7]
    target.next_round(tokens, 4)
    tokens += [42]  # decoded without the proposal (timeout, or dropped by batch size)
    assert target.next_round(tokens, 2) == Round(4, [42], 2)


def test_a_short_proposal_rolls_back_only_what_the_draft_has():
    draft = DraftSync()
    assert draft.apply(Round(0, [5, 6, 7], 4)) == 0
    draft.proposed(3)  # room for 3 only
    assert draft.apply(Round(4, [42], 2)) == 3  # none kept: all three go
    draft.proposed(2)
    assert draft.apply(Round(1, [9], 2)) == 1  # kept 1 of gamma 2: drop the second
    assert draft.synced == 3 + 1 + 1 + 1


@pytest.mark.parametrize("round_, first, field", [
    (Round(0, [1, 2], 0), True, "gamma"),
    (Round(0, [1, 2], MAX_GAMMA + 1), True, "gamma"),
    (Round(0, [], 2), True, "append_tokens"),
    (Round(1, [1, 2], 2), True, "discard"),
    (Round(3, [7], 2), False, "discard"),  # the last round asked for 2
    (Round(-1, [7], 2), False, "discard"),
    (Round(0, [7], 2), False, "discard"),  # asked 2, proposed 1: at most 1 can have been kept
])
def test_the_draft_refuses_a_round_that_breaks_the_protocol_and_keeps_its_state(round_, first, field):
    draft = DraftSync()
    if not first:
        draft.apply(Round(0, [1, 2, 3], 2))
        draft.proposed(1 if round_.discard == 0 else 2)
    before = (draft.synced, draft.asked, draft.proposal_len, draft.rounds)
    with pytest.raises(InvalidArgument) as err:
        draft.apply(round_)
    assert err.value.field == field
    assert (draft.synced, draft.asked, draft.proposal_len, draft.rounds) == before


def test_the_target_cannot_accept_more_than_was_proposed():
    target = DraftSync()
    target.next_round([1], 2)
    with pytest.raises(ValueError):
        target.accepted(3)


@pytest.mark.parametrize("seed", range(20))
def test_both_sides_agree_on_the_drafts_cache_whatever_happens_to_the_rounds(seed):
    """Random rounds: verified (any acceptance), lost (timed out or dropped),
    proposals of any length up to gamma. After every round the draft's cache is
    exactly the target's tokens, and both sides say the same ``synced``."""
    rng = random.Random(seed)
    target, draft = DraftSync(), DraftSync()
    tokens = [rng.randrange(100) for _ in range(rng.randint(1, 6))]
    cache: list[int] = []  # what the draft's KV cache holds
    for _ in range(40):
        gamma = rng.randint(1, MAX_GAMMA)
        round_ = target.next_round(tokens, gamma)
        rollback = draft.apply(round_)
        assert 0 <= rollback <= len(cache)
        del cache[len(cache) - rollback:]
        cache += round_.append
        assert draft.synced == target.synced == len(tokens) and cache == tokens
        proposal = [rng.randrange(100) for _ in range(rng.randint(0 if rng.random() < 0.2 else gamma, gamma))]
        cache += proposal
        draft.proposed(len(proposal))
        if rng.random() < 0.3:  # lost: the target decodes one token without it
            tokens.append(rng.randrange(100))
            continue
        n = rng.randint(0, len(proposal))
        target.accepted(n)
        assert 0 <= target.kept <= target.asked
        tokens += proposal[:n] + [rng.randrange(100)]
