"""Picking next tokens: greedy, or sampled by the Gumbel-max trick.

**Warping** (:func:`warp_scores`) turns a row of logits into log-weights, in
float64: subtract the row's maximum, *then* divide by the temperature, then
mask by top-k and top-p. Every kept token's score is finite and <= 0 and the
best is exactly 0, so no finite temperature >= 0 can overflow it: a
temperature so small that ``(l - max) / T`` overflows gives those tokens
score -inf (probability 0, the limit of the softmax), a huge one gives scores
near 0 (near uniform). Ties are kept together: top-k keeps every token tied
with the k-th, top-p every token as likely as the last one the nucleus needs.
Logits that are NaN or +inf, or all -inf, are the model's fault for that
sequence: :class:`~services.common.errors.ModelFault`.

**Sampling** is the Gumbel-max trick: the token at position ``t`` is
``argmax(scores + g_t)``, with ``g_t`` standard Gumbel noise that is a pure
function of (seed, t) (:func:`gumbel_noise`). That is an exact sample of
``softmax(scores)`` (Gumbel 1954; e.g. Maddison, Tarlow & Minka 2014, "A*
Sampling"), and, because the noise does not depend on the batch, on the
model's other positions or on whether speculation ran, a seeded request gives
the same tokens whatever it is batched with, a stream resumed elsewhere
(router failover) continues exactly as it would have, and a draft that uses
the same noise proposes the token the target will pick whenever their
distributions allow it (:mod:`services.speculative.rejection_sampler`).

Pure torch; any thread (the engine's in practice).
"""

from __future__ import annotations

import random

import math

import torch

from services.common.errors import ModelFault
from services.engine.sequence import SamplingOptions, TokenLogprob

_MASK64 = (1 << 64) - 1
#: Smallest uniform draw used for the noise (keeps -log(-log(u)) finite).
_TINY = torch.finfo(torch.float64).tiny


def position_seed(seed: int, position: int) -> int:
    """SplitMix64 of (seed, position): well-spread seeds for neighbouring positions."""
    z = (seed + 0x9E3779B97F4A7C15 * (position + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def random_seed() -> int:
    """A fresh seed for a request that did not bring one (63 bits)."""
    return random.getrandbits(63)


def gumbel_noise(seed: int, position: int, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise ``[vocab]`` (float64, CPU) for ``position``: a
    pure function of (seed, position), drawn by a CPU generator seeded with
    :func:`position_seed` so that it is the same on every device and, token
    id by token id, for any ``vocab`` (a draft whose vocabulary is padded to
    another size sees the same noise for the ids both have)."""
    gen = torch.Generator()
    gen.manual_seed(position_seed(seed, position))
    u = torch.rand(vocab, dtype=torch.float64, generator=gen).clamp_(min=_TINY)
    return u.log_().neg_().log_().neg_()  # -log(-log(u)), in place


def check_logits(logits: torch.Tensor) -> None:
    """Raises ModelFault unless every row of ``logits`` (``[..., vocab]``) is
    usable: no NaN or +inf, and at least one finite value (-inf masks a token).
    One reduction on the usual path (``amax`` propagates NaN), on the hot path
    of every sampled row; the details only when something is wrong."""
    if bool(torch.isfinite(logits.amax(-1)).all()):  # no NaN (amax propagates it), no +inf, not all -inf
        return
    if torch.isnan(logits).any():
        raise ModelFault("the model's scores for this sequence are NaN; the request cannot continue")
    if torch.isposinf(logits).any():
        raise ModelFault("the model's scores for this sequence are +inf; the request cannot continue")
    if not torch.isfinite(logits).any(-1).all():
        raise ModelFault("the model masked every token for this sequence (all scores -inf); "
                         "the request cannot continue")


def warp_scores(logits: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """Log-weights (float64, the shape of ``logits``: ``[..., vocab]``) after
    temperature, top-k and top-p along the last dimension, by the rule in the
    module docstring: kept tokens finite and <= 0 (the best 0), dropped ones
    -inf; ``softmax`` of the result is the sampling distribution. Greedy
    options (temperature 0) warp at temperature 1 (for callers that ask for a
    distribution). Raises ModelFault for unusable logits."""
    check_logits(logits)
    scores = logits.double()
    scores = scores - scores.max(-1, keepdim=True).values
    if opts.temperature > 0:
        scores = scores / opts.temperature
    vocab = scores.shape[-1]
    if opts.top_k and 0 < opts.top_k < vocab:
        kth = torch.topk(scores, opts.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0 < opts.top_p < 1:
        probs = torch.softmax(scores, dim=-1)
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        # The nucleus: the smallest prefix whose mass reaches top_p (the token
        # that crosses it included); its last token's probability is the floor.
        inside = (sorted_probs.cumsum(-1) - sorted_probs) < opts.top_p
        floor = sorted_probs.masked_fill(~inside, float("inf")).min(-1, keepdim=True).values
        scores = scores.masked_fill(probs < floor, float("-inf"))
    return scores


def warp(logits: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """The sampling distribution (float64 probabilities, ``[..., vocab]``):
    ``softmax`` of :func:`warp_scores`. Raises ModelFault for unusable logits."""
    return torch.softmax(warp_scores(logits, opts), dim=-1)


def gumbel_argmax(scores: torch.Tensor, seed: int, position: int) -> int:
    """``argmax(scores + g)`` over a ``[vocab]`` row of log-weights (-inf:
    excluded), ``g`` the noise of (seed, position): one exact draw from
    ``softmax(scores)``."""
    noise = gumbel_noise(seed, position, scores.shape[-1]).to(scores.device)
    return int(torch.argmax(scores.double() + noise))


def draw(probs: torch.Tensor, seed: int, position: int) -> int:
    """One token from a ``[vocab]`` distribution (non-negative, not all 0),
    reproducibly for (seed, position): :func:`gumbel_argmax` of its logarithm."""
    return gumbel_argmax(torch.log(probs.double()), seed, position)


def sample(logits: torch.Tensor, opts: SamplingOptions, seed: int, position: int,
           want_probs: bool = False) -> tuple[int, torch.Tensor | None]:
    """The next token for one sequence (``logits`` is ``[vocab]``) and, if asked,
    its distribution (``[vocab]``, float64). Greedy: the argmax; else the
    Gumbel-max draw of (seed, position). Pure: any thread (the engine's in
    practice). Raises ModelFault for unusable logits."""
    if opts.greedy:
        best, index = logits.max(-1)  # one pass: the first maximal id, and a value that is NaN/inf if the row is
        if not math.isfinite(float(best)):
            check_logits(logits)  # raises, saying what is wrong
        return int(index), (warp(logits, opts) if want_probs else None)
    scores = warp_scores(logits, opts)
    token = gumbel_argmax(scores, seed, position)
    return token, (torch.softmax(scores, dim=-1) if want_probs else None)


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Each of ``tokens``' log-probability under the row of ``logits``
    (``[len(tokens), vocab]``, row i the distribution token i was drawn from)
    and the ``top`` most likely alternatives of its row: the log-softmax of the
    raw logits (float32; OpenAI's and vLLM's default, not the warped sampling
    distribution). Pure; any thread."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    picked = lp.gather(-1, torch.tensor(tokens, device=lp.device).unsqueeze(-1)).squeeze(-1).tolist()
    if top:
        values, ids = torch.topk(lp, min(top, lp.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(tokens)
    return [TokenLogprob(t, p, tp) for t, p, tp in zip(tokens, picked, tops)]
