"""Checks a generation request against the model it will run on (pure)."""

from __future__ import annotations

from dataclasses import replace

from services.common.errors import InvalidArgument, OutOfRange
from services.common.validation import check_sampling_values, check_stop_sequences
from services.engine.sequence import GenerationRequest


def fit_context(request: GenerationRequest, max_context: int) -> None:
    """With ``sampling.fit_context``, lowers ``max_new_tokens`` to the tokens
    the context of ``max_context`` leaves after the prompt; unchanged when it
    fits, or when the prompt leaves none (:func:`validate` refuses that)."""
    s = request.sampling
    room = max_context - len(request.prompt_ids)
    if s.fit_context and 0 < room < s.max_new_tokens:
        request.sampling = replace(s, max_new_tokens=room)


def validate(request: GenerationRequest, vocab_size: int, max_context: int) -> None:
    """Raises InvalidArgument / OutOfRange naming the offending field."""
    s = request.sampling
    if not request.prompt_ids:
        raise InvalidArgument("prompt", "must not be empty")
    bad = [t for t in [*request.prompt_ids, *request.resume_ids] if not 0 <= t < vocab_size]
    if bad:
        raise OutOfRange("prompt.tokens", f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    check_sampling_values(s.temperature, s.top_p, s.top_k, s.max_new_tokens, len(s.stop))
    check_stop_sequences(s.stop)
    prompt_len = len(request.prompt_ids)
    if request.scoring:  # nothing is generated: the prompt may fill the context
        if prompt_len > max_context:
            raise OutOfRange("prompt", f"has {prompt_len} tokens; the model's context is {max_context}")
        return
    if prompt_len >= max_context:
        raise OutOfRange("prompt", f"has {prompt_len} tokens; the model's context is {max_context}, and a prompt "
                                   f"must leave room for a token: at most {max_context - 1}")
    if prompt_len + s.max_new_tokens > max_context:
        raise OutOfRange("sampling.max_new_tokens",
                         f"prompt ({prompt_len} tokens) + max_new_tokens ({s.max_new_tokens}) exceeds "
                         f"the model's context of {max_context}; ask for at most {max_context - prompt_len}")
    if len(request.resume_ids) >= s.max_new_tokens:
        raise InvalidArgument("resume_tokens", "must be fewer than max_new_tokens")
