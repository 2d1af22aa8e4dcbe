"""ProposeRequest/ProposeResponse ⇄ engine types."""

from __future__ import annotations

from services.common.errors import InvalidArgument
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2
from services.common.validation import check_gamma, distribution_params
from services.engine.sequence import SamplingOptions


def gamma_of(msg: model_pb2.ProposeRequest) -> int:
    return check_gamma("gamma", msg.gamma)


def draft_sampling(s: gen.SamplingParams, gamma: int) -> SamplingOptions:
    """How the draft samples; stop sequences and EOS are the target's business."""
    return SamplingOptions(**distribution_params(s), max_new_tokens=gamma, ignore_eos=True)
