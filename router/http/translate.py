"""OpenAI API bodies ⇄ llmesh's contract (pure: no I/O).

A request becomes one ``GenerateRequest`` per choice (``n`` per prompt,
OpenAI's order: prompt-major); the chunks of each choice fold into a
:class:`Choice`, which writes the API's choice objects, whole or as stream
deltas. Errors become the API's error body and HTTP status in
:func:`error_body`, from the same status code the gRPC front door would send
(:func:`services.common.status.status_of`).
"""

from __future__ import annotations

import codecs
import json
import math

from router.http.schemas import ChatCompletionRequest, CompletionRequest, SamplingBody
from services.common import status
from services.common.errors import InvalidArgument, OutOfRange
from services.common.stubs import generation_pb2 as gen

#: max_tokens when a request gives none: OpenAI's for completions; chat has no
#: documented default (the context's end), so a bounded one. Either is lowered
#: to what the model's context leaves after the prompt (SamplingParams.fit_context).
DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}
#: The API's finish reasons (an end-of-sequence token is a "stop", as in the API).
FINISH_REASONS = {gen.FINISH_REASON_LENGTH: "length", gen.FINISH_REASON_EOS: "stop",
                  gen.FINISH_REASON_STOP: "stop", gen.FINISH_REASON_CANCELLED: "abort",
                  gen.FINISH_REASON_ERROR: "error"}
PRIORITIES = {"batch": gen.PRIORITY_BATCH, "normal": gen.PRIORITY_NORMAL, "interactive": gen.PRIORITY_INTERACTIVE}
#: The largest value of the contract's int32 fields: a larger top_k is clamped to
#: it (no restriction either way), a larger max_tokens refused with the number
#: sent; the target answers for what is still too many (max_tokens past the
#: model's context) with its own message.
INT32_MAX = 2 ** 31 - 1
#: Chat roles the contract has (the API's "developer" is a system turn).
CHAT_ROLES = {"developer": "system"}

#: HTTP status of each gRPC status code, and the API's error type.
HTTP_STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"), "OUT_OF_RANGE": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"), "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"), "NOT_FOUND": (404, "not_found_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"), "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"), "CANCELLED": (499, "cancelled"),
}
#: The contract's field names -> the API's (for an error's ``param``).
PARAMS = {"sampling.temperature": "temperature", "sampling.top_p": "top_p", "sampling.top_k": "top_k",
          "sampling.max_new_tokens": "max_tokens", "sampling.stop": "stop", "sampling.seed": "seed",
          "prompt": "prompt", "prompt.text": "prompt", "prompt.tokens": "prompt", "prompt.chat": "messages",
          "prompt.chat.messages": "messages", "logprobs": "logprobs", "priority": "priority"}


# -- requests ---------------------------------------------------------------
#: Generations one request may make (prompts x n): each is a task and an upstream call from the
#: moment the request is read, before any admission bound is consulted.
MAX_CHOICES = 1024


def prompts_of(body: CompletionRequest) -> list[gen.Prompt]:
    """The prompts of a completion request (one per string or token-id list)."""
    p = body.prompt
    if isinstance(p, str):
        return [gen.Prompt(text=p)]
    if not p:
        raise InvalidArgument("prompt", "must not be empty")
    if isinstance(p[0], str):
        return [gen.Prompt(text=t) for t in p]
    if isinstance(p[0], int):
        return [gen.Prompt(tokens=gen.TokenIds(ids=p))]
    return [gen.Prompt(tokens=gen.TokenIds(ids=ids)) for ids in p]


def chat_prompt(body: ChatCompletionRequest) -> gen.Prompt:
    return gen.Prompt(chat=gen.ChatMessages(messages=[
        gen.ChatMessage(role=CHAT_ROLES.get(m.role, m.role), content=m.text()) for m in body.messages]))


def sampling_of(body: SamplingBody, max_tokens: int | None, kind: str) -> gen.SamplingParams:
    if max_tokens is not None and max_tokens > INT32_MAX:  # said with the number sent, not a clamped one
        raise OutOfRange("sampling.max_new_tokens", f"{max_tokens} is more than any model's context "
                                                    f"(the contract's bound is {INT32_MAX} tokens)")
    # No bound sent: the default, or what the context leaves when that is less (as vLLM); one sent must fit.
    s = gen.SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                           max_new_tokens=min(DEFAULT_MAX_TOKENS[kind] if max_tokens is None else max_tokens,
                                              INT32_MAX),
                           ignore_eos=body.ignore_eos, fit_context=max_tokens is None)
    if body.top_p is not None:
        s.top_p = body.top_p
    if body.top_k is not None and body.top_k > 0:
        s.top_k = min(body.top_k, INT32_MAX)
    if body.stop:  # an empty stop string is no stop, alone or in a list (the gRPC contract refuses one)
        s.stop.extend(t for t in ([body.stop] if isinstance(body.stop, str) else body.stop) if t)
    if body.seed is not None:
        s.seed = body.seed % 2 ** 64  # a negative (vLLM's signed) seed as the contract's unsigned one
    return s


def generate_requests(body: SamplingBody, request_id: str) -> list[gen.GenerateRequest]:
    """One GenerateRequest per choice: ``n`` per prompt, prompt-major. A seeded
    request's choice j samples with seed + j (independent choices, each
    reproducible). Raises InvalidArgument for what the body's types allow but
    the API does not (an empty prompt list)."""
    chat = isinstance(body, ChatCompletionRequest)
    if chat:
        prompts = [chat_prompt(body)]
        max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        echo = False
        if max_tokens == 0:
            raise InvalidArgument("sampling.max_new_tokens", "must be >= 1 in a chat completion, got 0")
    else:
        prompts = prompts_of(body)
        max_tokens, top, echo = body.max_tokens, body.logprobs, body.echo
        if max_tokens == 0 and not echo:
            raise InvalidArgument("sampling.max_new_tokens", "must be >= 1, got 0 (0 scores the prompt, and needs "
                                                             "echo: true to return it)")
        if len(prompts) * body.n > MAX_CHOICES:
            raise InvalidArgument("prompt", f"{len(prompts)} prompts x n {body.n} would make {len(prompts) * body.n} "
                                            f"generations; one request makes at most {MAX_CHOICES}: split it")
    sampling = sampling_of(body, max_tokens, "chat" if chat else "completion")
    priority = PRIORITIES[body.priority] if body.priority else gen.PRIORITY_UNSPECIFIED
    out = []
    for prompt in prompts:
        for j in range(body.n):
            req = gen.GenerateRequest(request_id=f"{request_id}-{len(out)}", prompt=prompt, sampling=sampling,
                                      priority=priority, echo_prompt=echo, prompt_logprobs=echo and top is not None)
            if top is not None:
                req.logprobs = top
            if j and sampling.HasField("seed"):
                req.sampling.seed = (sampling.seed + j) % 2 ** 64
            out.append(req)
    return out


# -- responses --------------------------------------------------------------
class Choice:
    """One choice's chunks, folded: text, finish reason, usage and logprobs."""

    __slots__ = ("index", "text", "finish_reason", "prompt_tokens", "completion_tokens", "logprobs", "offset",
                 "decoder")

    def __init__(self, index: int) -> None:
        self.index = index
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.prompt_tokens = self.completion_tokens = 0
        #: Prompt then generated TokenLogprobs (whole responses).
        self.logprobs: list[gen.TokenLogprob] = []
        #: Characters of text before the next token (completions' text_offset), and the
        #: decoder of the tokens' bytes that counts them (it holds a partial character back).
        self.offset = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, chunk: gen.GenerateChunk) -> None:
        self.text.append(chunk.text)
        if chunk.HasField("usage"):
            self.prompt_tokens, self.completion_tokens = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
        if chunk.finish_reason:
            self.finish_reason = FINISH_REASONS[chunk.finish_reason]

    # completions
    def completion_logprobs(self, entries) -> dict:
        """The legacy completions ``logprobs`` object of ``entries``; the
        ``top_logprobs`` dict holds the chosen token and the alternatives
        (as vLLM's), None for the first prompt token. ``text_offset``: each
        token's offset in characters into the choice's text, where a token
        holding part of a character is at that character (non-decreasing,
        never past the text)."""
        tokens, lps, tops, offsets = [], [], [], []
        end = sum(len(t) for t in self.text)  # the text so far: no offset past it
        for e in entries:
            tokens.append(token_of(e))
            has = e.HasField("logprob")
            lps.append(e.logprob if has else None)
            top = {token_of(t): t.logprob for t in e.top}
            if has:
                top.setdefault(token_of(e), e.logprob)
            tops.append(top if has else None)
            offsets.append(min(self.offset, end))
            self.offset += len(self.decoder.decode(bytes_of(e)))
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def completion(self, logprobs: bool) -> dict:
        return {"index": self.index, "text": "".join(self.text),
                "logprobs": self.completion_logprobs(self.logprobs) if logprobs else None,
                "finish_reason": self.finish_reason}

    # chat
    @staticmethod
    def chat_logprobs(entries) -> dict:
        def one(e: gen.TokenLogprob) -> dict:
            return {"token": token_of(e), "logprob": e.logprob, "bytes": list(bytes_of(e))}

        return {"content": [{**one(e), "top_logprobs": [one(t) for t in e.top]} for e in entries]}

    def chat(self, logprobs: bool) -> dict:
        return {"index": self.index, "message": {"role": "assistant", "content": "".join(self.text)},
                "logprobs": self.chat_logprobs(self.logprobs) if logprobs else None,
                "finish_reason": self.finish_reason}


def bytes_of(e: gen.TokenLogprob) -> bytes:
    """The bytes a token stands for (its text's UTF-8 from a target that does not send them)."""
    return e.token_bytes or e.token.encode("utf-8")


def token_of(e: gen.TokenLogprob) -> str:
    """The API's string of a token: its text, or, when its bytes are not UTF-8
    on their own (part of a character), ``bytes:`` and the bytes escaped
    (``bytes:\\xe6\\x97``), as OpenAI and vLLM write it."""
    try:
        return bytes_of(e).decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in bytes_of(e))


def usage_of(choices: list[Choice], n: int) -> dict:
    """Token counts of a request: each prompt counted once (choice 0 of its ``n``)."""
    prompt = sum(c.prompt_tokens for c in choices if c.index % n == 0)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict) -> bytes:
    """One Server-Sent Event carrying ``payload`` as JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


# -- errors -----------------------------------------------------------------
def _named(field: str, max_tokens: str = "max_tokens", prompt: str = "prompt") -> tuple[str, str] | None:
    """The API parameter a contract field path belongs to and the path's rest
    ("prompt.chat.messages[2].content" -> ("messages", "[2].content")), None
    for a field the API does not name; ``max_tokens``: the name the client
    gave the output bound (chat's ``max_completion_tokens`` or ``max_tokens``);
    ``prompt``: what it sent the prompt as (a chat's ``messages``: a target
    says "prompt: has 9008 tokens" of a conversation too long)."""
    for contract in sorted(PARAMS, key=len, reverse=True):
        if field == contract or field.startswith((contract + "[", contract + ".")):
            name = PARAMS[contract]
            name = max_tokens if name == "max_tokens" else prompt if name == "prompt" else name
            return name, field[len(contract):]
    return None


def param_of(message: str, max_tokens: str = "max_tokens", prompt: str = "prompt") -> str | None:
    """The API parameter an error message names ("sampling.top_p: ..." -> "top_p")."""
    named = _named(message.partition(":")[0], max_tokens, prompt)
    return named[0] if named else None


def prompt_name(body: SamplingBody) -> str:
    """What the client sent its prompt as: a chat's ``messages``, a completion's ``prompt``."""
    return "messages" if isinstance(body, ChatCompletionRequest) else "prompt"


def api_message(message: str, max_tokens: str = "max_tokens", prompt: str = "prompt") -> str:
    """The message with its leading contract field named as the API names it
    ("sampling.max_new_tokens: ..." -> "max_tokens: ...", "prompt.chat.messages[2].content: ..." ->
    "messages[2].content: ..."), so that an HTTP client reads the parameter it sent
    (``max_tokens``: the name it gave the output bound)."""
    field, sep, rest = message.partition(":")
    if not sep:
        return message
    rest = rest.replace("max_new_tokens", max_tokens)  # the one contract name the text itself quotes
    named = _named(field, max_tokens, prompt)
    return (named[0] + named[1] if named else field) + sep + rest


def max_tokens_name(body: SamplingBody) -> str:
    """The name the client gave the output bound: chat's ``max_completion_tokens`` when it sent that."""
    return "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"


def error_payload(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_body(exc: BaseException, max_tokens: str = "max_tokens",
               prompt: str = "prompt") -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, the API's error body, headers) of an exception, from the
    gRPC status the router would answer (a traceback never leaves: anything
    unexpected is an internal error with an incident id, logged)."""
    code, message, trailers = status.status_of(exc)
    http, type_ = HTTP_STATUS.get(code.name, (500, "internal_error"))
    headers = {}
    if http == 429:
        headers["Retry-After"] = str(max(1, math.ceil(status.retry_after_s(trailers))))
    return (http, error_payload(api_message(message, max_tokens, prompt), type_, code.name.lower(),
                                param_of(message, max_tokens, prompt)), headers)
