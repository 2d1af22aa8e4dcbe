"""Picking next tokens: greedy, or sampled from a warped distribution.

Sampling is a pure function of (distribution, seed, position): each draw uses
a generator seeded from the sequence's seed and the token's position. So a
seeded request gives the same tokens whatever it is batched with, and a
stream resumed elsewhere (router failover) continues exactly as it would
have.
"""

from __future__ import annotations

import torch

from services.engine.sequence import SamplingOptions

_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """SplitMix64 of (seed, position): well-spread seeds for neighbouring positions."""
    z = (seed + 0x9E3779B97F4A7C15 * (position + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def warp(logits: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """Probabilities (float32, the shape of ``logits``: ``[..., vocab]``) after
    temperature, top-k and top-p, along the last dimension.

    For greedy options this is the softmax at temperature 1 (used only where a
    distribution is asked for; greedy picks the argmax).
    """
    logits = logits.float()
    if opts.temperature > 0:
        logits = logits / opts.temperature
    if opts.top_k and 0 < opts.top_k < logits.shape[-1]:
        kth = torch.topk(logits, opts.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0 < opts.top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        drop_sorted = (cumulative - sorted_probs) >= opts.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, seed: int, position: int) -> int:
    """One token from a ``[vocab]`` distribution, reproducibly for (seed, position)."""
    gen = torch.Generator(device=probs.device)
    gen.manual_seed(position_seed(seed, position))
    return int(torch.multinomial(probs, 1, generator=gen))


def sample(logits: torch.Tensor, opts: SamplingOptions, seed: int, position: int,
           want_probs: bool = False) -> tuple[int, torch.Tensor | None]:
    """The next token for one sequence (``logits`` is ``[vocab]``) and, if asked,
    its distribution (``[vocab]``). Pure: any thread (the engine's in practice)."""
    if opts.greedy:
        token = int(torch.argmax(logits))
        return token, (warp(logits, opts) if want_probs else None)
    probs = warp(logits, opts)
    return draw(probs, seed, position), (probs if want_probs else None)
