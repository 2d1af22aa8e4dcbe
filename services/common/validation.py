"""The one validation of a generation request, and the limits it enforces.

Every service that accepts a ``GenerateRequest`` (the router at its door, the
target before its engine) calls :func:`check_generate_request`; the draft
checks its stream's sampling with :func:`distribution_params`; the engine
checks in-process requests with :func:`check_sampling_values`. The rules are
written once, here. What needs the model (vocabulary, context length) is the
engine's to check.

Pure functions on the caller's thread; each raises
:class:`~services.common.errors.InvalidArgument` naming the offending field.
"""

from __future__ import annotations

import math
import re

from services.common.errors import InvalidArgument, OutOfRange
from services.common.stubs import generation_pb2 as gen

#: Most tokens a draft may propose in one round (γ), everywhere: requests,
#: flags, ``Configure`` and ``DraftModel.Propose``.
MAX_GAMMA = 16
#: Most stop sequences per request.
MAX_STOP_SEQUENCES = 16
#: Longest stop sequence, in characters.
MAX_STOP_CHARS = 1024
#: Longest text prompt any llmesh service accepts, in bytes of UTF-8 (2 MiB:
#: more than half a million tokens of English; a model service refuses far
#: less when its context cannot hold it, see ``services.serving``). Checked
#: before anything is tokenized, so a huge prompt costs its bytes only.
MAX_PROMPT_BYTES = 2 * 1024 * 1024
#: Most token ids in a prompt, and in ``resume_tokens``.
MAX_PROMPT_TOKENS = 512 * 1024
#: Longest ``request_id`` (it is echoed in every chunk).
MAX_REQUEST_ID_CHARS = 256
#: Most alternatives per token a request may ask log-probabilities of (OpenAI's bound).
MAX_LOGPROBS = 20
#: The roles a chat turn may have.
CHAT_ROLES = ("system", "user", "assistant", "tool")


#: A host name (letters, digits, dots, hyphens, underscores: DNS names, IPv4,
#: compose service names) or an IPv6 address in brackets.
_HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,252})|\[[0-9A-Fa-f:.]{2,45}(?:%[A-Za-z0-9]+)?\]")


def valid_address(address: str) -> bool:
    """``host:port``: a host name or IPv4 address, or an IPv6 address in
    brackets, and an ASCII decimal port in [1, 65535]."""
    host, sep, port = address.rpartition(":")
    return bool(sep and _HOST.fullmatch(host) and port.isascii() and port.isdigit() and len(port) <= 5
                and 0 < int(port) <= 65535)


def check_address(name: str, address: str) -> str:
    """``address`` when :func:`valid_address`, else InvalidArgument naming ``name``."""
    if not valid_address(address):
        raise InvalidArgument(name, f"must be host:port (e.g. 127.0.0.1:50071), got {address[:100]!r}")
    return address


def check_gamma(name: str, gamma: int) -> int:
    """γ in ``[1, MAX_GAMMA]``; returns it."""
    if not 1 <= gamma <= MAX_GAMMA:
        raise InvalidArgument(name, f"must be in [1, {MAX_GAMMA}], got {gamma}")
    return gamma


def check_gamma_range(gamma_min: int, gamma: int, gamma_max: int) -> None:
    """``1 <= gamma_min <= gamma <= gamma_max <= MAX_GAMMA`` (adaptive γ's bounds)."""
    if not 1 <= gamma_min <= gamma <= gamma_max <= MAX_GAMMA:
        raise InvalidArgument("gamma", f"need 1 <= gamma_min <= gamma <= gamma_max <= {MAX_GAMMA}, got "
                                       f"gamma_min={gamma_min}, gamma={gamma}, gamma_max={gamma_max}")


def check_distribution_values(temperature: float, top_p: float, top_k: int) -> None:
    """The parameters that shape a next-token distribution."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidArgument("sampling.temperature", f"must be a finite number >= 0, got {temperature}")
    if not 0 < top_p <= 1:  # also rejects NaN
        raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InvalidArgument("sampling.top_k", f"must be >= 0, got {top_k}")


def check_stop_sequences(stop) -> None:
    """At most MAX_STOP_SEQUENCES stop strings, each non-empty (an empty one
    would match before the first token) and at most MAX_STOP_CHARS long."""
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument("sampling.stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stop)}")
    if any(not text for text in stop):
        raise InvalidArgument("sampling.stop", "a stop sequence must not be empty (it would end the stream at once)")
    if any(len(text) > MAX_STOP_CHARS for text in stop):
        raise InvalidArgument("sampling.stop", f"each stop sequence must be at most {MAX_STOP_CHARS} characters")


def check_sampling_values(temperature: float, top_p: float, top_k: int, max_new_tokens: int,
                          num_stop: int) -> None:
    """Every sampling rule that needs no model."""
    check_distribution_values(temperature, top_p, top_k)
    if max_new_tokens <= 0:
        raise InvalidArgument("sampling.max_new_tokens", f"must be >= 1 (or 0 with echo_prompt or prompt_logprobs, "
                                                         f"to score the prompt), got {max_new_tokens}")
    if num_stop > MAX_STOP_SEQUENCES:
        raise InvalidArgument("sampling.stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {num_stop}")


def distribution_params(s: gen.SamplingParams) -> dict:
    """temperature, top_p, top_k and seed of a SamplingParams, checked, with
    the defaults of unset fields (top_p 1, top_k 0 = off, seed None)."""
    top_p = s.top_p if s.HasField("top_p") else 1.0
    top_k = s.top_k if s.HasField("top_k") else 0
    check_distribution_values(s.temperature, top_p, top_k)
    return {"temperature": s.temperature, "top_p": top_p, "top_k": top_k,
            "seed": s.seed if s.HasField("seed") else None}


def priority_of(value: int) -> int:
    """The queue priority of a Priority enum value (unspecified is normal)."""
    if value not in gen.Priority.values():
        names = ", ".join(gen.Priority.keys())
        raise InvalidArgument("priority", f"unknown value {value}; use one of {names}")
    return gen.PRIORITY_NORMAL if value == gen.PRIORITY_UNSPECIFIED else value


def check_prompt(prompt: gen.Prompt) -> str:
    """Which kind of prompt is set ("text" or "tokens"); refuses an empty one,
    and (OutOfRange) one above :data:`MAX_PROMPT_BYTES` / :data:`MAX_PROMPT_TOKENS`."""
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        if not prompt.text:
            raise InvalidArgument("prompt.text", "must not be empty")
        size = len(prompt.text) if len(prompt.text) > MAX_PROMPT_BYTES else len(prompt.text.encode("utf-8"))
        if size > MAX_PROMPT_BYTES:
            raise OutOfRange("prompt.text", f"is {size} bytes of UTF-8; llmesh accepts at most {MAX_PROMPT_BYTES} "
                                            f"bytes, and a model's context usually far fewer")
    if kind == "tokens":
        if not prompt.tokens.ids:
            raise InvalidArgument("prompt.tokens", "must not be empty")
        if len(prompt.tokens.ids) > MAX_PROMPT_TOKENS:
            raise OutOfRange("prompt.tokens", f"has {len(prompt.tokens.ids)} ids; llmesh accepts at most "
                                              f"{MAX_PROMPT_TOKENS}, and a model's context usually far fewer")
    if kind == "chat":
        check_chat(prompt.chat)
    if kind is None:
        raise InvalidArgument("prompt", "must not be empty: set prompt.text, prompt.tokens or prompt.chat")
    return kind


def check_chat(chat: gen.ChatMessages) -> None:
    """At least one turn, each with a known role; at most :data:`MAX_PROMPT_BYTES` of content in all."""
    if not chat.messages:
        raise InvalidArgument("prompt.chat.messages", "must hold at least one message")
    size = 0
    for i, m in enumerate(chat.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidArgument(f"prompt.chat.messages[{i}].role",
                                  f"must be one of {', '.join(CHAT_ROLES)}, got {m.role[:40]!r}")
        size += len(m.content) if len(m.content) > MAX_PROMPT_BYTES else len(m.content.encode("utf-8"))
        if size > MAX_PROMPT_BYTES:
            raise OutOfRange("prompt.chat.messages", f"hold more than {MAX_PROMPT_BYTES} bytes of UTF-8")


def check_printable(name: str, value: str) -> None:
    """Refuses control characters (newline, NUL, escape, ...) in a name that is
    logged and echoed back (a request id, a pool, an instance id): they would
    forge log lines or corrupt what a terminal shows."""
    bad = next((c for c in value if c < " " or "\x7f" <= c <= "\x9f"), None)
    if bad is not None:
        raise InvalidArgument(name, f"must not hold control characters, got {bad!r} at {value.index(bad)}")


def is_scoring(req: gen.GenerateRequest) -> bool:
    """Whether ``req`` only scores its prompt (max_new_tokens 0 with echo_prompt
    or prompt_logprobs; see generation.proto)."""
    return req.sampling.max_new_tokens == 0 and (req.echo_prompt or req.prompt_logprobs)


def check_generate_request(req: gen.GenerateRequest) -> None:
    """Everything about a GenerateRequest that needs no model."""
    if not req.HasField("sampling"):
        raise InvalidArgument("sampling", "must be set (at least sampling.max_new_tokens)")
    check_prompt(req.prompt)
    priority_of(req.priority)
    s = req.sampling
    distribution_params(s)
    if s.max_new_tokens == 0 and not is_scoring(req):
        raise InvalidArgument("sampling.max_new_tokens", "must be >= 1, got 0 (0 only scores the prompt: it needs "
                                                         "echo_prompt or prompt_logprobs)")
    # 0 is scoring here (refused above otherwise): the target only prefills the prompt.
    check_sampling_values(s.temperature, 1.0, 0, s.max_new_tokens or 1, len(s.stop))
    check_stop_sequences(s.stop)
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters, "
                                            f"got {len(req.request_id)}")
    check_printable("request_id", req.request_id)
    if req.speculation.HasField("gamma"):
        check_gamma("speculation.gamma", req.speculation.gamma)
    if req.draft_address:
        check_address("draft_address", req.draft_address)
    if req.HasField("logprobs") and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise InvalidArgument("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {req.logprobs}")
    if req.resume_tokens and len(req.resume_tokens) >= s.max_new_tokens:
        raise InvalidArgument("resume_tokens", "must be fewer than sampling.max_new_tokens")
    if len(req.resume_tokens) > MAX_PROMPT_TOKENS:
        raise OutOfRange("resume_tokens", f"has {len(req.resume_tokens)} ids; at most {MAX_PROMPT_TOKENS}")
