"""Which proposed tokens the target keeps (vLLM's rejection sampler).

Greedy requests keep proposals while they equal the target's argmax. Sampled
requests use **Gumbel-coupled verification** (:func:`accept_gumbel`), the rule
the Speculator runs:

- every sampled token at position ``t`` is ``argmax(log p_t + g_t)``, with
  ``g_t`` Gumbel noise that is a pure function of (seed, t)
  (:func:`services.engine.sampler.gumbel_noise`);
- the draft, given the target's seed, proposes ``x_t = argmax(log q_t + g_t)``
  with the *same* noise;
- the target keeps ``x_t`` while it equals its own ``y_t = argmax(log p_t + g_t)``
  and emits ``y_t`` at the first mismatch (and at position gamma when every
  proposal was kept).

Every emitted token is thus the target's own Gumbel-max draw with fresh noise
per position: the output has exactly the target's distribution, and a seeded
request gives the same tokens with speculation or without it, whatever its
batch mates (the seed contract holds when speculation switches off by batch
size). The draft sends no distributions. This is the Gumbel-max coupling of
the draft's and target's draws, as in Daliri, Musco & Suresh (2024),
"Coupling without Communication and Drafter-Invariant Speculative Decoding"
(their "drafter-invariant" speculative decoding: the output does not depend on
the draft), who also bound its match probability below by (1 - TV) / (1 + TV).

Its price is acceptance: a proposal is kept with probability
``P(argmax(log p + g) = argmax(log q + g))``, at most the
``sum_x min(p(x), q(x))`` (= 1 - TV) of the rejection rule of Leviathan,
Kalman & Matias (2023), Algorithm 1, and Chen et al. (2023), Algorithm 2
(:func:`accept_sampled`, kept here: it is the optimal coupling, but its draws
depend on the draft's, so a seeded output changes with the draft and with
whether speculation ran). Measured by ``benchmarks/gumbel_acceptance.py``
(exact per-position figures; ``benchmarks/gumbel-acceptance.json``): on
p = (0.2, 0.4, 0.4), q = (0.6, 0.3, 0.1), per-token acceptance 0.600
(rejection) vs 0.550 (Gumbel); on the built target/draft pair along the
target's own continuations of four prompts (192 positions), 0.419 vs 0.360
at T = 1 and 0.469 vs 0.433 at T = 0.7, i.e. 1.70 vs 1.55 and 1.84 vs 1.74
tokens per round at gamma 4 (positions taken as independent); greedy
requests are unaffected. We pay that for the seed contract and an output that
does not depend on the draft.

Draws are pure functions of (seed, position). Pure torch on whatever device
the tensors are on; any thread (the engine thread in practice).
"""

from __future__ import annotations

import torch

from services.engine.sampler import check_logits, draw, gumbel_argmax, position_seed

#: Separates the acceptance coin flips from the token draws of the same position.
_COIN_SALT = 0x5DEECE66D
#: Separates the residual draw (Leviathan's rule) from the draft's draw of the
#: same position: a draft that samples with the request's seed must not couple with it.
_RESIDUAL_SALT = 0x2545F4914F6CDD1D


def accept_greedy(target_logits: torch.Tensor, draft_tokens: list[int]) -> tuple[int, int]:
    """Greedy decoding: keep proposals while they equal the target's argmax.

    ``target_logits`` is ``[gamma + 1, vocab]`` (row i predicts the token after
    the i-th fed token), ``draft_tokens`` the gamma proposals. Returns
    (accepted count n in [0, gamma], the target's token after them). Raises
    ModelFault for NaN or +inf logits.
    """
    check_logits(target_logits)
    argmax = target_logits.argmax(-1).tolist()
    n = 0
    while n < len(draft_tokens) and argmax[n] == draft_tokens[n]:
        n += 1
    return n, argmax[n]


def accept_gumbel(scores: torch.Tensor, draft_tokens: list[int], seed: int,
                  first_position: int) -> tuple[int, int]:
    """Gumbel-coupled verification (see the module docstring).

    ``scores`` is ``[gamma + 1, vocab]``: the target's warped log-weights
    (:func:`services.engine.sampler.warp_scores`), ``draft_tokens`` the gamma
    proposals, ``first_position`` the position of the first of them in the
    sequence. Returns (n accepted in [0, gamma], the target's token after
    them). Draws noise only up to the first mismatch.
    """
    for i in range(len(draft_tokens) + 1):
        own = gumbel_argmax(scores[i], seed, first_position + i)
        if i == len(draft_tokens) or own != draft_tokens[i]:
            return i, own
    raise AssertionError("unreachable")  # pragma: no cover


def coin(seed: int, position: int) -> float:
    """A uniform draw in [0, 1) for the acceptance test at ``position`` (a pure
    function of ``seed`` and ``position``)."""
    gen = torch.Generator()
    gen.manual_seed(position_seed(seed ^ _COIN_SALT, position))
    return float(torch.rand((), dtype=torch.float64, generator=gen))


def residual_distribution(p_i: torch.Tensor, q_i: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) for ``[vocab]`` distributions ``p_i`` and ``q_i``,
    computed in float64 and returned in ``p_i``'s dtype; falls back to p where
    p <= q everywhere (then rejection had probability 0)."""
    residual = torch.clamp(p_i.double() - q_i.double(), min=0.0)
    total = residual.sum()
    return (residual / total).to(p_i.dtype) if total > 0 else p_i


def _check_distributions(name: str, rows: torch.Tensor) -> None:
    if not (torch.isfinite(rows).all() and (rows >= 0).all() and (rows.sum(-1) > 0).all()):
        raise ValueError(f"{name} must hold finite, non-negative probabilities with mass in every row")


def accept_sampled(p: torch.Tensor, q: torch.Tensor, draft_tokens: list[int], seed: int,
                   first_position: int) -> tuple[int, int]:
    """Speculative sampling by rejection (Leviathan et al. Algorithm 1).

    ``p`` is ``[gamma + 1, vocab]`` (the target's warped distributions), ``q``
    is ``[gamma, vocab]`` (the draft's, as it sampled), ``first_position`` is
    the position of the first proposed token in the sequence. Each proposal
    ``x_i`` is kept with probability ``min(1, p_i(x_i) / q_i(x_i))``; at the
    first rejection the next token is drawn from ``norm(max(0, p_i - q_i))``
    with noise of its own (salted, so a draft that drew ``x_i`` with the same
    seed is not coupled with it); when all ``gamma`` are kept, one more is
    drawn from ``p_{gamma+1}``. Returns (n accepted in [0, gamma], the next
    token). Raises ValueError for rows that are not distributions and
    IndexError when a token id is outside the vocabulary.
    """
    _check_distributions("p", p)
    _check_distributions("q", q)
    gamma = len(draft_tokens)
    for i, x in enumerate(draft_tokens):
        position = first_position + i
        p_x, q_x = float(p[i, x]), float(q[i, x])
        r = coin(seed, position)
        if q_x <= 0.0 or r < min(1.0, p_x / q_x):
            continue
        return i, draw(residual_distribution(p[i], q[i]), seed ^ _RESIDUAL_SALT, position)
    return gamma, draw(p[gamma], seed, first_position + gamma)
