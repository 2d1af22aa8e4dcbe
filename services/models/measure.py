"""Measurements the model build reports: draft/target agreement, generation speed, equivalence.

Contracts: every function runs the models in inference mode, float32, on the current
torch thread setting, and changes no model state. Speeds are wall-clock HF
``generate`` (greedy, no early stop at eos) after one warm-up call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .train import greedy_continuations, left_pad, right_pad


@torch.inference_mode()
def argmax_agreement(
    draft: torch.nn.Module,
    target: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    batch_size: int = 32,
    ranges: Sequence[tuple[int, int]] = (),
) -> dict:
    """How often the draft's next-token argmax equals the target's on the continuations.

    For each ``prompt + continuation`` both models score every position once (teacher
    forcing, as a speculative verifier does); the positions compared are those that
    predict a continuation token. Returns ``{"agreement", "positions",
    "target_consistency", "by_range"}``: ``target_consistency`` is how often the
    target's argmax equals the given continuation token (1.0 when the continuations
    are the target's own greedy output, up to float ties between batched generation
    and a full forward); ``by_range`` maps ``"a-b"`` to the agreement on continuation
    tokens ``a`` to ``b - 1`` for each of ``ranges`` (how agreement holds up as a
    generation gets longer).
    """
    draft.eval()
    target.eval()
    hits = torch.zeros(max((len(c) for c in continuations), default=0))
    seen = torch.zeros_like(hits)
    consistent = 0
    for i in range(0, len(prompts), batch_size):
        ps = prompts[i : i + batch_size]
        cs = continuations[i : i + batch_size]
        ids, mask = right_pad([list(p) + list(c) for p, c in zip(ps, cs)], 0)
        t_arg = target(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        d_arg = draft(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        for j, (p, c) in enumerate(zip(ps, cs)):
            # Position k predicts token k + 1: continuation tokens are predicted by
            # positions len(p) - 1 .. len(p) + len(c) - 2.
            sl = slice(len(p) - 1, len(p) + len(c) - 1)
            hits[: len(c)] += (t_arg[j, sl] == d_arg[j, sl]).float()
            seen[: len(c)] += 1
            consistent += int((t_arg[j, sl] == torch.as_tensor(c)).sum())
    count = int(seen.sum())
    return {
        "agreement": float(hits.sum()) / max(1, count),
        "positions": count,
        "target_consistency": consistent / max(1, count),
        "by_range": {f"{a}-{b}": float(hits[a:b].sum()) / max(1.0, float(seen[a:b].sum())) for a, b in ranges},
    }


@torch.inference_mode()
def generation_speed(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    batch_size: int,
    new_tokens: int,
    pad_id: int,
    repeats: int = 2,
) -> dict:
    """Greedy HF ``generate`` speed at ``batch_size`` (prompts left-padded).

    One warm-up call, then ``repeats`` timed calls on successive batches of
    ``prompts`` (cycled when too few). Returns ``{"batch_size", "new_tokens",
    "tokens_per_s", "ms_per_token"}``: generated tokens over all sequences per second,
    and milliseconds per decoding step (one token for every sequence of the batch).
    """
    model.eval()

    def batch(k: int) -> list[Sequence[int]]:
        return [prompts[(k * batch_size + j) % len(prompts)] for j in range(batch_size)]

    def run(k: int) -> float:
        ids, mask = left_pad(batch(k), pad_id)
        start = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=pad_id,
        )
        return time.perf_counter() - start

    run(0)
    seconds = sum(run(k + 1) for k in range(repeats)) / repeats
    return {
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "tokens_per_s": batch_size * new_tokens / seconds,
        "ms_per_token": 1000.0 * seconds / new_tokens,
    }


@torch.inference_mode()
def equivalence(
    small: torch.nn.Module,
    large: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    pad_id: int,
) -> dict:
    """Whether ``large`` computes what ``small`` computes on ``prompts``.

    Compares greedy continuations (batched, left-padded) and the logits of a full
    forward over ``prompt + continuation``. Returns ``{"greedy_identical",
    "max_abs_logit_diff", "prompts", "new_tokens"}``.
    """
    a = greedy_continuations(small, prompts, new_tokens, pad_id, batch_size=len(prompts))
    b = greedy_continuations(large, prompts, new_tokens, pad_id, batch_size=len(prompts))
    ids, mask = right_pad([list(p) + c for p, c in zip(prompts, a)], pad_id)
    diff = (small(input_ids=ids, attention_mask=mask).logits - large(input_ids=ids, attention_mask=mask).logits).abs()
    return {
        "greedy_identical": a == b,
        "max_abs_logit_diff": float(diff[mask.bool()].max()),
        "prompts": len(prompts),
        "new_tokens": new_tokens,
    }
