"""Generation requests and chunks: protobuf ⇄ engine types (no I/O).

The checks are :mod:`services.common.validation`'s, the same ones the router
runs; this module only builds engine types from a checked request.
"""

from __future__ import annotations

from dataclasses import replace

from services.common.stubs import generation_pb2 as gen
from services.common.validation import check_generate_request, distribution_params, is_scoring, priority_of
from services.engine.sequence import FinishReason, GenerationRequest, SamplingOptions

FINISH_REASONS = {
    FinishReason.LENGTH: gen.FINISH_REASON_LENGTH,
    FinishReason.EOS: gen.FINISH_REASON_EOS,
    FinishReason.STOP: gen.FINISH_REASON_STOP,
    FinishReason.CANCELLED: gen.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: gen.FINISH_REASON_ERROR,
}
FINISH_REASON_OF_PB = {v: k for k, v in FINISH_REASONS.items()}


def sampling_of(s: gen.SamplingParams) -> SamplingOptions:
    """The engine's SamplingOptions of a SamplingParams already checked."""
    return SamplingOptions(**distribution_params(s), max_new_tokens=s.max_new_tokens, stop=tuple(s.stop),
                           ignore_eos=s.ignore_eos, fit_context=s.fit_context)


#: Checks everything about a GenerateRequest that needs no model; raises
#: InvalidArgument / OutOfRange naming the field.
check_request = check_generate_request


def request_of(req: gen.GenerateRequest, prompt_ids: list[int], deadline: float | None) -> GenerationRequest:
    """The engine's request for a checked ``req`` whose prompt is ``prompt_ids``
    (its token ids, or its text tokenized); ``deadline`` in ``time.monotonic()``
    seconds, None for none. A scoring request (:func:`is_scoring`) only
    prefills its prompt (``GenerationRequest.scoring``)."""
    sampling = sampling_of(req.sampling)
    scoring = is_scoring(req)
    if scoring:  # no token is sampled; a bound of 1 keeps the engine's sampling checks as they are
        sampling = replace(sampling, max_new_tokens=1, stop=(), fit_context=False)
    return GenerationRequest(
        prompt_ids=prompt_ids, sampling=sampling, scoring=scoring,
        request_id=req.request_id, priority=priority_of(req.priority), deadline=deadline,
        resume_ids=list(req.resume_tokens),
        logprobs=req.logprobs if req.HasField("logprobs") else None, prompt_logprobs=req.prompt_logprobs,
    )


def logprobs_pb(entries, token_text) -> list[gen.TokenLogprob]:
    """TokenLogprob messages of engine TokenLogprobs; ``token_text(ids)`` gives
    each id's (text, bytes) (one batched decode for all the ids of the entries)."""
    ids = [e.token_id for e in entries] + [i for e in entries for i, _ in e.top]
    text = dict(zip(ids, token_text(ids))) if ids else {}
    out = []
    for e in entries:
        (token, raw) = text[e.token_id]
        pb = gen.TokenLogprob(token_id=e.token_id, token=token, token_bytes=raw,
                              top=[gen.TokenLogprob(token_id=i, token=text[i][0], token_bytes=text[i][1], logprob=v)
                                   for i, v in e.top])
        if e.logprob is not None:
            pb.logprob = e.logprob
        out.append(pb)
    return out
