"""Generation requests and chunks: protobuf ⇄ engine types (no I/O)."""

from __future__ import annotations

import math
from collections.abc import Callable

from services.common.errors import InvalidArgument
from services.common.stubs import generation_pb2 as gen
from services.engine.sequence import FinishReason, GenerationRequest, SamplingOptions

FINISH_REASONS = {
    FinishReason.LENGTH: gen.FINISH_REASON_LENGTH,
    FinishReason.EOS: gen.FINISH_REASON_EOS,
    FinishReason.STOP: gen.FINISH_REASON_STOP,
    FinishReason.CANCELLED: gen.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: gen.FINISH_REASON_ERROR,
}
FINISH_REASON_OF_PB = {v: k for k, v in FINISH_REASONS.items()}

MAX_STOP_SEQUENCES = 16


def priority_of(value: int) -> int:
    """The queue priority of a Priority enum value; unknown values are refused."""
    if value not in gen.Priority.values():
        names = ", ".join(gen.Priority.keys())
        raise InvalidArgument("priority", f"unknown value {value}; use one of {names}")
    return gen.PRIORITY_NORMAL if value == gen.PRIORITY_UNSPECIFIED else value


def distribution_params(s: gen.SamplingParams) -> dict:
    """temperature, top_p, top_k and seed of a SamplingParams, checked."""
    if not (math.isfinite(s.temperature) and s.temperature >= 0):
        raise InvalidArgument("sampling.temperature", f"must be a finite number >= 0, got {s.temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:  # also rejects NaN
        raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {top_p}")
    top_k = s.top_k if s.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidArgument("sampling.top_k", f"must be >= 0, got {top_k}")
    return {"temperature": s.temperature, "top_p": top_p, "top_k": top_k,
            "seed": s.seed if s.HasField("seed") else None}


def sampling_of(s: gen.SamplingParams) -> SamplingOptions:
    """Checks what needs no model (the engine checks context and vocabulary)."""
    params = distribution_params(s)
    if s.max_new_tokens <= 0:
        raise InvalidArgument("sampling.max_new_tokens", f"must be >= 1, got {s.max_new_tokens}")
    if len(s.stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument("sampling.stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(s.stop)}")
    return SamplingOptions(**params, max_new_tokens=s.max_new_tokens, stop=tuple(s.stop), ignore_eos=s.ignore_eos)


def prompt_ids_of(prompt: gen.Prompt, encode: Callable[[str], list[int]]) -> list[int]:
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        if not prompt.text:
            raise InvalidArgument("prompt.text", "must not be empty")
        return encode(prompt.text)
    if kind == "tokens":
        if not prompt.tokens.ids:
            raise InvalidArgument("prompt.tokens", "must not be empty")
        return list(prompt.tokens.ids)
    raise InvalidArgument("prompt", "must not be empty: set prompt.text or prompt.tokens")


def request_of(req: gen.GenerateRequest, encode: Callable[[str], list[int]],
               deadline: float | None) -> GenerationRequest:
    if not req.HasField("sampling"):
        raise InvalidArgument("sampling", "must be set (at least sampling.max_new_tokens)")
    return GenerationRequest(
        prompt_ids=prompt_ids_of(req.prompt, encode), sampling=sampling_of(req.sampling),
        request_id=req.request_id, priority=priority_of(req.priority), deadline=deadline,
        resume_ids=list(req.resume_tokens),
    )
