"""ProposeRequest/ProposeResponse ⇄ engine types."""

from __future__ import annotations

import math

from services.common.errors import InvalidArgument
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2
from services.common.distributions import distribution_of, distribution_pb  # noqa: F401 - re-exported
from services.draft.config import MAX_GAMMA
from services.engine.sequence import SamplingOptions


def gamma_of(msg: model_pb2.ProposeRequest) -> int:
    if not 1 <= msg.gamma <= MAX_GAMMA:
        raise InvalidArgument("gamma", f"must be in [1, {MAX_GAMMA}], got {msg.gamma}")
    return msg.gamma


def draft_sampling(s: gen.SamplingParams, gamma: int) -> SamplingOptions:
    """How the draft samples; stop sequences and EOS are the target's business."""
    if not (math.isfinite(s.temperature) and s.temperature >= 0):
        raise InvalidArgument("sampling.temperature", f"must be a finite number >= 0, got {s.temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {top_p}")
    top_k = s.top_k if s.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidArgument("sampling.top_k", f"must be >= 0, got {top_k}")
    return SamplingOptions(temperature=s.temperature, top_p=top_p, top_k=top_k, max_new_tokens=gamma,
                           seed=s.seed if s.HasField("seed") else None, ignore_eos=True)
