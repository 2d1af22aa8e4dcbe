"""ProposeRequest/ProposeResponse ⇄ engine and speculation types (no I/O)."""

from __future__ import annotations

import torch

from services.common.errors import InvalidArgument
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2
from services.common.validation import distribution_params
from services.draft.proposer import StreamStart
from services.engine.sequence import SamplingOptions
from services.speculative.distributions import distribution_pb
from services.speculative.sync import Round


def round_of(msg: model_pb2.ProposeRequest) -> Round:
    """The round a message carries (checked by the proposer's DraftSync)."""
    return Round(discard=msg.discard, append=list(msg.append_tokens), gamma=msg.gamma)


def start_of(msg: model_pb2.ProposeRequest) -> StreamStart:
    """The first message's request id and sampling; stop sequences and EOS are
    the target's business. Raises InvalidArgument naming a bad sampling field
    or an unknown method."""
    if msg.method not in gen.SpeculationMethod.values():
        raise InvalidArgument("method", f"unknown method {msg.method}; use DRAFT_MODEL or NGRAM")
    sampling = SamplingOptions(**distribution_params(msg.sampling), max_new_tokens=1, ignore_eos=True)
    return StreamStart(msg.request_id, sampling, msg.want_probs,
                       ngram=msg.method == gen.SPECULATION_METHOD_NGRAM)


def response_pb(tokens: list[int], probs: list[torch.Tensor], compute_ms: float) -> model_pb2.ProposeResponse:
    return model_pb2.ProposeResponse(tokens=tokens, distributions=[distribution_pb(p) for p in probs],
                                     compute_ms=compute_ms)
