"""The rejection sampler (pure torch): greedy prefix matching and exact speculative sampling."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from services.engine.sampler import draw
from services.speculative import rejection_sampler as acceptance
from services.speculative.rejection_sampler import accept_greedy, accept_sampled
from services.speculative.fallback import Action, MethodRecord, review
from services.speculative.gamma import GammaController

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
    action, reason = review(MethodRecord(c.rounds, 0.0, c.ema), 0, min_acceptance=0.25, min_rounds=4,
                            can_fall_back=False)
    assert action is Action.STOP and reason.startswith("acceptance 0.")
    fixed = GammaController(gamma=3, lo=3, hi=3, fixed=True)
    fixed.update(3, 3)
    assert fixed.gamma == 3


# The component case of issue 11: gamma = 1, the draft samples its proposal with
# the request's seed at the same position the target then samples at.
P3 = torch.tensor([[0.2, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
Q3 = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
COMPONENT_SEEDS = 20_000  # sees a 4-point shift at any sane significance


def test_rejection_rule_is_exact_when_the_draft_samples_with_the_same_seed():
    """Leviathan's rule with a draft that drew its proposal from the same
    (seed, position): the residual draw must not be coupled with the draft's."""
    counts = torch.zeros(3)
    for seed in range(COMPONENT_SEEDS):
        proposal = [draw(Q3[0], seed, 0)]
        n, token = accept_sampled(P3, Q3, proposal, seed, first_position=0)
        counts[proposal[0] if n else token] += 1
    assert chi_square_p(counts, P3[0].float()) > SIGNIFICANCE


def gumbel_first_tokens(p: torch.Tensor, q: torch.Tensor, seeds: int) -> tuple[torch.Tensor, float]:
    """Histogram of the first emitted token under Gumbel-coupled verification,
    and the fraction of proposals kept."""
    from services.engine.sampler import gumbel_argmax

    counts, kept = torch.zeros(p.shape[1]), 0
    for seed in range(seeds):
        proposal = [gumbel_argmax(torch.log(q[0]), seed, 0)]  # the draft, with the target's seed
        n, token = acceptance.accept_gumbel(torch.log(p), proposal, seed, first_position=0)
        first = proposal[0] if n else token
        assert first == gumbel_argmax(torch.log(p[0]), seed, 0)  # what the target alone samples
        counts[first] += 1
        kept += n
    return counts, kept / seeds


def test_gumbel_verification_is_exact_on_the_component_case():
    counts, acceptance_rate = gumbel_first_tokens(P3, Q3, COMPONENT_SEEDS)
    assert chi_square_p(counts, P3[0].float()) > SIGNIFICANCE
    # No coupling keeps more than sum(min(p, q)) = 0.6; Daliri et al.'s lower
    # bound (1 - TV) / (1 + TV) = 0.6 / 1.4.
    assert 0.6 / 1.4 - 0.02 < acceptance_rate < 0.6 + 0.02


def test_gumbel_verification_is_exact_over_positions():
    """Two proposals and the bonus: the emitted tokens are the target's own
    draws at every position, whatever the draft proposed."""
    from services.engine.sampler import gumbel_argmax

    log_p, log_q = torch.log(P.double()), torch.log(Q.double())
    counts = torch.zeros(P.shape[1])
    for seed in range(4000):
        proposal = [gumbel_argmax(log_q[i], seed, 5 + i) for i in range(2)]
        n, token = acceptance.accept_gumbel(log_p, proposal, seed, first_position=5)
        emitted = proposal[:n] + [token]
        assert emitted == [gumbel_argmax(log_p[i], seed, 5 + i) for i in range(n + 1)]
        counts[emitted[0]] += 1
    assert chi_square_p(counts, P[0]) > SIGNIFICANCE


def test_the_component_test_catches_coupled_draws(monkeypatch):
    """If the target drew its replacement with the draft's noise (the fault of
    issue 11), the emitted distribution would lean away from p; the test sees it."""
    monkeypatch.setattr(acceptance, "_RESIDUAL_SALT", 0)
    counts = torch.zeros(3)
    for seed in range(8000):
        proposal = [draw(Q3[0], seed, 0)]
        n, token = accept_sampled(P3, Q3, proposal, seed, first_position=0)
        counts[proposal[0] if n else token] += 1
    assert chi_square_p(counts, P3[0].float()) < SIGNIFICANCE


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_rejection_rule_refuses_rows_that_are_not_distributions(bad):
    q = Q.clone()
    q[1, 2] = bad
    with pytest.raises(ValueError, match="q must hold"):
        accept_sampled(P, q, [0, 1], 1, 0)


def test_residual_distribution_is_safe_at_the_extremes():
    p = torch.tensor([1e-320, 0.0, 1.0], dtype=torch.float64)
    assert torch.equal(acceptance.residual_distribution(p, p), p)  # p == q: falls back to p
    tiny = acceptance.residual_distribution(torch.tensor([5e-324, 1.0 - 5e-324], dtype=torch.float64),
                                            torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.isfinite(tiny).all() and tiny.sum() == pytest.approx(1.0)
