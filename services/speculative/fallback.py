"""When a request stops proposing with the draft model and proposes by n-gram lookup instead.

A request that does not name its proposal method (``SpeculationParams.method``
unset, the target's ``--speculative-method draft_model``) starts with the
draft model and falls back to prompt lookup (:mod:`services.speculative.ngram`,
run in the target's own process: no draft, no stream, no draft compute) when
the draft model cannot serve it or does not pay for it:

- **no draft**: the target has no draft address for it (the request proposes
  by lookup from its first round);
- **draft failed**: its draft's stream failed (unreachable, not serving, gone
  mid-request), stopped answering (rounds past their deadline) or ran out of
  context;
- **low acceptance**: what :func:`review` says after each verified round: the
  measured acceptance is below ``min_acceptance`` after ``min_rounds`` rounds
  (TensorRT-LLM's ``acceptance_rate_threshold``, which there turns
  speculation off for good), or the cost model
  (:mod:`services.speculative.cost_model`) would turn speculation off for
  this request at its acceptance although it would speculate at full
  acceptance (so the acceptance, not the batch size, is what does not pay).

The switch goes one way, at most once: the draft's acceptance was measured
not to pay, and going back would cost the draft a prefill of the whole
sequence. After it, the lookup's own acceptance is measured (per method: each
has its own estimate and its own engine-wide prior) and the same review
keeps it while it pays; when it does not either, the request decodes on
without speculation (below ``min_acceptance``) or the cost model's batch gamma
leaves it out, as for any request. Greedy output stays identical and sampled
output exact: the verification rule does not depend on the proposer (a
lookup is a point-mass proposal, for which the Gumbel-coupled rule keeps the
target's distribution).

Names: the methods are vLLM's (``draft_model``, ``ngram``, the latter with
``prompt_lookup_max/min``). Neither vLLM nor SGLang switches a request's
method by itself; llama.cpp's server mixes a draft model with n-gram drafting
and TensorRT-LLM turns an n-gram drafter off below an acceptance threshold.
We keep vLLM's names and decide with the measured cost model (SmartSpec, Liu
et al. 2024).

Pure Python, no state: the Speculator calls :func:`review` on the engine thread.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from services.speculative.cost_model import choose_gamma

#: The reason a request that no draft serves gives for proposing by lookup from its first round.
NO_DRAFT_REASON = "no draft to propose with"

#: The proposal methods, as ``Proposer.kind`` and the stats name them (vLLM's names).
DRAFT_MODEL = "draft_model"
NGRAM = "ngram"


class Fallback(str, enum.Enum):
    """Why a request switched from the draft model to n-gram lookup (a metric label)."""

    NO_DRAFT = "no_draft"
    DRAFT_FAILED = "draft_failed"
    LOW_ACCEPTANCE = "low_acceptance"


@dataclass(frozen=True)
class MethodRecord:
    """What one request measured of its current method."""

    #: Verified rounds with it.
    rounds: int
    #: The cost model's per-token acceptance estimate (in [0, 1]).
    alpha: float
    #: The acceptance moving average the ``min_acceptance`` floor reads.
    ema: float


class Action(enum.Enum):
    """What :func:`review` says a request does next."""

    KEEP = "keep"            # go on with the current method
    FALL_BACK = "fall_back"  # switch to n-gram lookup
    STOP = "stop"            # stop speculating (decode on alone)


def review(record: MethodRecord, others: int, periods: Sequence[float] | None, min_acceptance: float,
           min_rounds: int, can_fall_back: bool, fallback_periods: Sequence[float] | None = None,
           ready: Sequence[float] | None = None, sat_out: Sequence[float] | None = None) -> tuple[Action, str]:
    """What a request does after a verified round with its current method, and why.

    ``others`` is the number of other rows in the batch. The batch shares one
    gamma, so the request is priced as a batch of ``others + 1`` sequences of
    its acceptance: a request is what does not pay when such a batch would
    not speculate. (Pricing it as the one speculating row among rows that
    decode one token each made every request of a small batch fall back: at
    4 streams on 2 cores 8-12 of 16 requests left a draft whose rounds paid
    for the batch.) ``periods[g]`` the measured seconds of a step verifying
    ``g`` proposals per row with the current method, ``ready``/``sat_out``
    what such steps found (:func:`~services.speculative.cost_model.goodput`;
    None: all verified), ``fallback_periods`` the same for n-gram lookup
    (None: no cost model, e.g. a static ``disable_by_batch_size``, or nothing
    measured at this batch size yet); ``can_fall_back``: the request is still
    on the draft model and did not pin it.

    The method does not pay when its acceptance moving average is below
    ``min_acceptance`` after ``min_rounds`` rounds, or when
    :func:`~services.speculative.cost_model.choose_gamma` gives gamma 0 at
    its acceptance while some method would speculate here at full acceptance
    (so it is not the batch size that rules speculation out: a big batch
    whose verify step costs more than any proposal could save keeps its
    method, and the batch's gamma leaves it out until the costs change).
    Then the request falls back when it can; else it stops below
    ``min_acceptance`` and keeps its method on a cost-model "no". The reason
    is "" for KEEP."""
    if record.rounds < 1:
        return Action.KEEP, ""
    if record.rounds >= min_rounds and record.ema < min_acceptance:
        reason = f"acceptance {record.ema:.2f} (moving average of its last rounds) below {min_acceptance:g}"
        return (Action.FALL_BACK if can_fall_back else Action.STOP), reason
    # A batch of ``others + 1`` sequences of one acceptance: every term of its goodput scales with the
    # batch, so the best gamma is one sequence's (the batch size is in the periods, measured at it).
    batch = others + 1
    if can_fall_back and periods is not None \
            and choose_gamma([record.alpha], 0, periods, ready=ready, sat_out=sat_out) == 0 \
            and any(p is not None and choose_gamma([1.0], 0, p) > 0 for p in (periods, fallback_periods)):
        return Action.FALL_BACK, (f"at an estimated acceptance of {record.alpha:.2f} (its rounds so far, "
                                  "shrunk towards the engine-wide rate) the cost model would not speculate with "
                                  f"{batch} sequence{'s' if batch != 1 else ''} running (their steps and drafts "
                                  "as measured)")
    return Action.KEEP, ""
