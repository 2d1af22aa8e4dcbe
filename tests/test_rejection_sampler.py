"""The rejection sampler (pure torch): greedy prefix matching and exact speculative sampling."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from services.engine.sampler import draw
from services.speculative import rejection_sampler as acceptance
from services.speculative.rejection_sampler import accept_greedy, accept_sampled
from services.speculative.gamma import GammaController, SpeculationSettings

SIGNIFICANCE = 1e-3


def one_hot_logits(tokens, vocab=10):
    logits = torch.full((len(tokens), vocab), -5.0)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return logits


@pytest.mark.parametrize("target, draft, n, nxt", [
    ([1, 2, 3, 4], [1, 2, 3], 3, 4),   # all accepted, bonus token from the last row
    ([1, 2, 3, 4], [1, 7, 3], 1, 2),   # first mismatch at position 1: target's own token
    ([5, 2, 3, 4], [1, 2, 3], 0, 5),
    ([9, 9], [9], 1, 9),
])
def test_greedy_accepts_while_argmax_matches(target, draft, n, nxt):
    assert accept_greedy(one_hot_logits(target), draft) == (n, nxt)


# p (target) and q (draft) over a 6-token vocabulary, for two proposal positions plus the bonus.
P = torch.tensor([[0.05, 0.40, 0.25, 0.10, 0.15, 0.05],
                  [0.30, 0.10, 0.10, 0.30, 0.10, 0.10],
                  [0.10, 0.10, 0.20, 0.20, 0.20, 0.20]])
Q = torch.tensor([[0.40, 0.10, 0.10, 0.10, 0.20, 0.10],
                  [0.10, 0.50, 0.10, 0.10, 0.10, 0.10]])


def speculate_first_token(samples: int) -> torch.Tensor:
    """Histogram of the first token speculative sampling emits (draft tokens drawn from Q)."""
    counts = torch.zeros(P.shape[1])
    for seed in range(samples):
        proposal = [draw(Q[0], seed + 1_000_003, 0), draw(Q[1], seed + 2_000_003, 1)]
        n, token = accept_sampled(P, Q, proposal, seed, first_position=0)
        counts[proposal[0] if n >= 1 else token] += 1
    return counts


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(chisquare(counts.numpy(), expected.numpy()).pvalue)


def test_sampled_output_has_exactly_the_target_distribution():
    counts = speculate_first_token(6000)
    assert chi_square_p(counts, P[0]) > SIGNIFICANCE


def test_the_test_catches_a_residual_replaced_by_plain_target_sampling(monkeypatch):
    """If rejection resampled from p instead of norm(max(0, p - q)), the output
    would lean toward q; the chi-square test above must see it."""
    monkeypatch.setattr(acceptance, "residual_distribution", lambda p_i, q_i: p_i)
    counts = speculate_first_token(6000)
    assert chi_square_p(counts, P[0]) < SIGNIFICANCE


def test_all_accepted_draws_the_bonus_from_the_last_row():
    # q == p: every proposal is accepted; the bonus token comes from P[2].
    q = P[:2].clone()
    counts = torch.zeros(6)
    for seed in range(3000):
        proposal = [draw(q[0], seed + 7, 0), draw(q[1], seed + 11, 1)]
        n, token = accept_sampled(P, q, proposal, seed, first_position=0)
        assert n == 2
        counts[token] += 1
    assert chi_square_p(counts, P[2]) > SIGNIFICANCE


def test_sampling_is_reproducible_for_a_seed():
    proposal = [0, 1]
    assert accept_sampled(P, Q, proposal, 123, 10) == accept_sampled(P, Q, proposal, 123, 10)


def test_residual_distribution_is_normalised_max_of_difference():
    r = acceptance.residual_distribution(P[0], Q[0])
    expected = torch.clamp(P[0] - Q[0], min=0)
    assert torch.allclose(r, expected / expected.sum())


def test_gamma_adapts_within_bounds_and_switches_off_on_low_acceptance():
    c = GammaController(gamma=4, lo=2, hi=6)
    for _ in range(5):
        c.update(c.gamma, c.gamma)
    assert c.gamma == 6
    for _ in range(10):
        c.update(0, c.gamma)
    assert c.gamma == 2
    assert not c.worth_it(SpeculationSettings(min_acceptance=0.25, min_rounds=4))
    fixed = GammaController(gamma=3, lo=3, hi=3, fixed=True)
    fixed.update(3, 3)
    assert fixed.gamma == 3
