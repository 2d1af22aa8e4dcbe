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
  this request at its acceptance, and would speculate with the lookup at the
  acceptance and hit rate the lookup has been measured to have.

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

from services.speculative.cost_model import Speculating, choose_gamma

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


@dataclass(frozen=True)
class Prospect:
    """What the cost model expects of one request proposing with one method
    at this batch size: its acceptance estimate with it, the measured step
    seconds per gamma with it (``periods[0]`` a plain step) and what such
    steps found among the sequences of this method (``ready``/``sat_out`` per
    gamma, :class:`~services.speculative.cost_model.Speculating`)."""

    alpha: float
    periods: Sequence[float]
    ready: Sequence[float] | None = None
    sat_out: Sequence[float] | None = None

    def pays(self) -> bool:
        """Whether a batch of sequences like this one would speculate (the
        batch size is in the periods, measured at it; every term of the
        goodput scales with the batch, so the best gamma is one sequence's)."""
        return choose_gamma([Speculating([self.alpha], self.ready, self.sat_out)], 0, self.periods) > 0


def review(record: MethodRecord, others: int, min_acceptance: float, min_rounds: int, can_fall_back: bool,
           current: Prospect | None = None, fallback: Prospect | None = None) -> tuple[Action, str]:
    """What a request does after a verified round with its current method, and why.

    ``others`` is the number of other rows in the batch. The batch shares one
    gamma, so the request is priced as a batch of ``others + 1`` sequences of
    its acceptance: a request is what does not pay when such a batch would
    not speculate. (Pricing it as the one speculating row among rows that
    decode one token each made every request of a small batch fall back: at
    4 streams on 2 cores 8-12 of 16 requests left a draft whose rounds paid
    for the batch.) ``current`` is the request's prospect with its method,
    ``fallback`` a request's with n-gram lookup at the lookup's engine-wide
    acceptance estimate and hit rate (both None: no cost model, e.g. a static
    ``disable_by_batch_size``, or nothing measured at this batch size yet);
    ``can_fall_back``: the request is still on the draft model and did not pin it.

    The method does not pay when its acceptance moving average is below
    ``min_acceptance`` after ``min_rounds`` rounds (then the request falls
    back when it can, else stops), or when a batch of its like would not
    speculate. On the latter the request falls back only where the lookup is
    expected to pay instead, as measured here: the lookup's acceptance and
    hit rate on the text this engine serves decide, not a perfect
    proposer's. (Falling back wherever a perfect lookup would pay sent 7-10
    of 16 requests at 4 streams from a draft accepted at 0.4-0.5 to a lookup
    accepted at 0.2 that seldom found anything, and their low estimates held
    the batch's one gamma at 0 where always speculating gave 1.5x,
    2026-12-01.) Otherwise the request keeps its method and the batch's gamma
    leaves it out while the costs stand. The reason is "" for KEEP."""
    if record.rounds < 1:
        return Action.KEEP, ""
    if record.rounds >= min_rounds and record.ema < min_acceptance:
        # Four digits: at two, 0.2496 read "acceptance 0.25 ... below 0.25".
        reason = f"acceptance {record.ema:.4g} (moving average of its last rounds) below {min_acceptance:g}"
        return (Action.FALL_BACK if can_fall_back else Action.STOP), reason
    batch = others + 1
    if can_fall_back and current is not None and fallback is not None and not current.pays() and fallback.pays():
        return Action.FALL_BACK, (f"at an estimated acceptance of {record.alpha:.2f} (its rounds so far, "
                                  "shrunk towards the engine-wide rate) the cost model would not speculate with "
                                  f"{batch} sequence{'s' if batch != 1 else ''} running (their steps and drafts "
                                  f"as measured), and would with n-gram lookup (estimated acceptance "
                                  f"{fallback.alpha:.2f})")
    return Action.KEEP, ""
