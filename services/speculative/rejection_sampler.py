"""The rejection sampler: which proposed tokens the target keeps (vLLM's rejection sampler).

Leviathan, Kalman & Matias (2023), "Fast Inference from Transformers via
Speculative Decoding", Algorithm 1, and Chen et al. (2023), "Accelerating
Large Language Model Decoding with Speculative Sampling", Algorithm 2. With
``p`` the target's and ``q`` the draft's distributions, each proposed token
``x_i`` is kept with probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first
rejection the next token is drawn from ``norm(max(0, p_i - q_i))``; when all
``gamma`` are kept, one more is drawn from ``p_{gamma+1}``. The output then
has exactly the target's distribution, whatever ``q`` is.

Draws are pure functions of (seed, position), like ordinary sampling, so a
seeded request is reproducible. Pure torch on whatever device the tensors are
on; any thread (the engine thread in practice).
"""

from __future__ import annotations

import torch

from services.engine.sampler import draw, position_seed

#: Separates the acceptance coin flips from the token draws of the same position.
_COIN_SALT = 0x5DEECE66D


def accept_greedy(target_logits: torch.Tensor, draft_tokens: list[int]) -> tuple[int, int]:
    """Greedy decoding: keep proposals while they equal the target's argmax.

    ``target_logits`` is ``[gamma + 1, vocab]`` (row i predicts the token after
    the i-th fed token), ``draft_tokens`` the gamma proposals. Returns
    (accepted count n in [0, gamma], the target's token after them).
    """
    argmax = target_logits.argmax(-1).tolist()
    n = 0
    while n < len(draft_tokens) and argmax[n] == draft_tokens[n]:
        n += 1
    return n, argmax[n]


def coin(seed: int, position: int) -> float:
    """A uniform draw in [0, 1) for the acceptance test at ``position`` (a pure
    function of ``seed`` and ``position``)."""
    gen = torch.Generator()
    gen.manual_seed(position_seed(seed ^ _COIN_SALT, position))
    return float(torch.rand((), generator=gen))


def residual_distribution(p_i: torch.Tensor, q_i: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) for ``[vocab]`` distributions ``p_i`` and ``q_i``;
    falls back to p where p <= q everywhere (then rejection had probability 0)."""
    residual = torch.clamp(p_i - q_i, min=0.0)
    total = residual.sum()
    return residual / total if total > 0 else p_i


def accept_sampled(p: torch.Tensor, q: torch.Tensor, draft_tokens: list[int], seed: int,
                   first_position: int) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. Algorithm 1).

    ``p`` is ``[gamma + 1, vocab]`` (the target's warped distributions), ``q``
    is ``[gamma, vocab]`` (the draft's, as it sampled), ``first_position`` is
    the position of the first proposed token in the sequence. Returns (n
    accepted in [0, gamma], the next token). Raises IndexError when a token id
    is outside the vocabulary.
    """
    gamma = len(draft_tokens)
    for i, x in enumerate(draft_tokens):
        position = first_position + i
        p_x, q_x = float(p[i, x]), float(q[i, x])
        r = coin(seed, position)
        if q_x <= 0.0 or r < min(1.0, p_x / q_x):
            continue
        return i, draw(residual_distribution(p[i], q[i]), seed, position)
    return gamma, draw(p[gamma], seed, first_position + gamma)
