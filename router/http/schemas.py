"""The OpenAI API's request bodies, typed (pydantic): ``/v1/completions`` and
``/v1/chat/completions``. Unknown fields are ignored, as the reference server
ignores them; a wrong type or a value out of range is a 400 naming the field
(:mod:`router.http.invalid` writes the message). ``null`` for an optional
field means its default, as the API takes it. Types are strict, as the
reference's are: ``"max_tokens": "5"`` is refused, not coerced (pydantic's
strict mode; a JSON integer still counts as a number where a float is asked);
numbers must be finite.

Parameters the API has that would change the answer and llmesh does not
implement (penalties, ``logit_bias``, ``best_of`` > ``n``, ``suffix``,
``response_format`` other than text, tools) are refused with a 400 naming
them, unless their value is the neutral default; llmesh never ignores one
silently.

llmesh's extensions: ``top_k``, ``ignore_eos`` and ``priority`` (a priority
class: batch, normal, interactive)."""

from __future__ import annotations

import struct
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from services.common.validation import MAX_PROMPT_TOKENS

#: Most independent choices one request may ask for.
MAX_N = 16
#: Most alternatives per token (OpenAI's bound).
MAX_TOP_LOGPROBS = 20


def _token_id(value: int) -> int:
    # The contract carries token ids as int32: a larger id is out of every vocabulary.
    if not 0 <= value < 2 ** 31:
        raise PydanticCustomError("token_id", "token id {id} is out of range: ids are >= 0 and below the "
                                              "model's vocabulary size", {"id": value})
    return value


TokenId = Annotated[int, AfterValidator(_token_id)]
#: Most prompts one completion request may carry (translate.MAX_CHOICES counts their choices), and most
#: token ids in one prompt (the contract's bound, services.common.validation.MAX_PROMPT_TOKENS): checked
#: as the body is validated, before a huge list is walked item by item (2026-12-02: 1.5 million prompt
#: strings held the front door's event loop, every other stream with it, for 5 s before the 400).
MAX_PROMPTS = 1024
MAX_PROMPT_IDS = MAX_PROMPT_TOKENS
#: Most messages in one chat request (far more than any context holds).
MAX_MESSAGES = 16 * 1024
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_PROMPT_IDS)]

#: What each union field takes, as a client reads it (the message when a value
#: fits none of its types). Every union field of these bodies has an entry
#: (a test walks the models).
SHAPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts ({\"type\": \"text\", \"text\": ...})",
    "tool_choice": "\"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
}


def unsupported(what: str, hint: str = "") -> PydanticCustomError:
    """The error of a parameter value llmesh does not implement ("<what> is not supported by llmesh<hint>")."""
    return PydanticCustomError("unsupported", "{what} is not supported by llmesh{hint}", {"what": what, "hint": hint})


#: Parameters other servers take that change the answer and llmesh does not implement -> (their
#: neutral values, what to say). Such a parameter is served at a neutral value (or null) and refused
#: with a 400 naming it otherwise: a 200 that ignored it would not be what the client asked for.
NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "min_tokens": ((0,), "a minimum number of tokens"),
    "stop_token_ids": (([],), "stop token ids (use stop strings)"),
    "repetition_penalty": ((1, 1.0), "a repetition penalty other than 1"),
    "min_p": ((0, 0.0), "min_p sampling (use top_p or top_k)"),
    "include_stop_str_in_output": ((False,), "including the stop string in the output"),
    "use_beam_search": ((False,), "beam search"),
    "length_penalty": ((1, 1.0), "a length penalty other than 1"),
    "bad_words": (([],), "bad words"),
    "allowed_token_ids": (([],), "a set of allowed token ids"),
    "truncate_prompt_tokens": ((), "prompt truncation (the prompt is never cut: a longer one is a 400)"),
    "prompt_logprobs": ((), "prompt_logprobs (on /v1/completions, echo with logprobs gives the prompt's)"),
    "guided_json": ((), "guided decoding"),
    "guided_regex": ((), "guided decoding"),
    "guided_choice": ((), "guided decoding"),
    "guided_grammar": ((), "guided decoding"),
    "structured_outputs": ((), "structured outputs"),
    "add_generation_prompt": ((True,), "a chat prompt without the assistant's turn opened"),
    "continue_final_message": ((False,), "continuing the final message"),
    "functions": (([],), "function calling"),
    "function_call": (("none", "auto"), "function calling"),
    "modalities": ((["text"],), "output other than text"),
    "audio": ((), "audio output"),
    "tool_calls": (([],), "a conversation with tool calls"),
}


def neutral_only(name: str, value: Any) -> Any:
    """``value`` where it is null or :data:`NEUTRAL`'s neutral value for ``name``, else the
    unsupported error naming what it asks for. Pure."""
    neutral, what = NEUTRAL[name]
    # 1 and 1.0 are the same number; false is not 0.
    if value is None or any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral):
        return value
    raise unsupported(what)


class Body(BaseModel):
    """Strict, finite, unknown fields ignored; ``null`` for a field with a
    default means that default (clients send nulls for unset values)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if v is not None or k not in cls.model_fields or cls.model_fields[k].is_required()}
        return data


class StreamOptions(Body):
    include_usage: bool = False


class SamplingBody(Body):
    """The fields both endpoints share."""

    #: Omitted: the model served, where there is one (as vLLM takes it).
    model: str | None = None
    #: 0 (completions, with echo): score the prompt and generate nothing (legacy API; lm-evaluation-harness).
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    #: Extension (vLLM's): the k most likely tokens; 0 or -1: off.
    top_k: int | None = Field(None, ge=-1)
    stop: str | list[str] | None = None
    #: vLLM's range (a signed 64-bit integer) and OpenAI's (unsigned): a negative seed is taken modulo 2^64.
    seed: int | None = Field(None, ge=-2 ** 63, lt=2 ** 64)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    #: Extension (vLLM's): keep generating past end-of-sequence tokens.
    ignore_eos: bool = False
    #: Extension: llmesh's priority class (the router's pool, the target's queue order and
    #: preemption of lower-priority running sequences when its batch is full).
    priority: Literal["batch", "normal", "interactive"] | None = None
    # Not implemented: refused unless neutral (0, empty).
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Any] | None = None
    # vLLM's sampling extensions, not implemented: refused unless neutral (NEUTRAL), since a vLLM client
    # that sends them expects them honoured (llmesh takes vLLM's top_k and ignore_eos).
    min_tokens: Any = None
    stop_token_ids: Any = None
    repetition_penalty: Any = None
    min_p: Any = None
    include_stop_str_in_output: Any = None
    use_beam_search: Any = None
    length_penalty: Any = None
    bad_words: Any = None
    allowed_token_ids: Any = None
    truncate_prompt_tokens: Any = None
    prompt_logprobs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None

    @field_validator("top_p")
    @classmethod
    def _top_p_survives_float32(cls, value: float | None) -> float | None:
        # The contract carries top_p as a 32-bit float: a positive value below its smallest (1e-300) would
        # arrive as 0, and be refused downstream as "got 0.0" of a value the client never sent.
        if value is not None and struct.unpack("f", struct.pack("f", value))[0] <= 0:
            raise PydanticCustomError("top_p", "must be > 0 as a 32-bit float (at least 1.5e-45), got {v}",
                                      {"v": value})
        return value

    @field_validator("stream_options")
    @classmethod
    def _options_need_a_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise PydanticCustomError("stream_options", "is only allowed when stream is true")
        return value

    @field_validator(*(name for name in ("min_tokens", "stop_token_ids", "repetition_penalty", "min_p",
                                         "include_stop_str_in_output", "use_beam_search", "length_penalty",
                                         "bad_words", "allowed_token_ids", "truncate_prompt_tokens",
                                         "prompt_logprobs", "guided_json", "guided_regex", "guided_choice",
                                         "guided_grammar", "structured_outputs")))
    @classmethod
    def _neutral_only(cls, value: Any, info: ValidationInfo) -> Any:
        return neutral_only(info.field_name, value)

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise unsupported("a non-zero penalty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict | None) -> dict | None:
        if value:
            raise unsupported("a non-empty map")
        return value


class CompletionRequest(SamplingBody):
    """``POST /v1/completions``."""

    #: A string, strings, token ids, or lists of token ids (one choice set per prompt).
    prompt: (str | Annotated[list[str], Field(max_length=MAX_PROMPTS)] | TokenIds
             | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)])
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Not implemented: refused unless neutral (best_of == n, empty suffix).
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_size(cls, value: Any) -> Any:
        # Counted before the items are: a 1.5-million-item list is refused in its length's time.
        if isinstance(value, list) and value:
            if isinstance(value[0], int) and not isinstance(value[0], bool):
                if len(value) > MAX_PROMPT_IDS:
                    raise PydanticCustomError("prompt_size", "has {n} token ids; a prompt has at most {most}",
                                              {"n": len(value), "most": MAX_PROMPT_IDS})
            elif len(value) > MAX_PROMPTS:
                raise PydanticCustomError("prompt_size", "has {n} prompts; one request takes at most {most}: "
                                                         "split it", {"n": len(value), "most": MAX_PROMPTS})
            else:
                long = next((i for i, p in enumerate(value) if isinstance(p, list) and len(p) > MAX_PROMPT_IDS), None)
                if long is not None:
                    raise PydanticCustomError("prompt_size", "prompt {i} has {n} token ids; a prompt has at "
                                                             "most {most}",
                                              {"i": long, "n": len(value[long]), "most": MAX_PROMPT_IDS})
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if value is not None and value < n:
            raise PydanticCustomError("best_of", "must be >= n ({n}), got {best_of}", {"n": n, "best_of": value})
        if value is not None and value > n:
            raise unsupported(f"best_of > n (ranking {value} candidates to return {n})",
                              f": ask for n={value} choices and pick among them")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise unsupported("a suffix (insertion after the completion)")
        return value


def text_only(value: str, what: str, hint: str) -> str:
    """``value`` when it is "text", else the unsupported error of ``what`` (a format
    string for the value, cut to 40 characters) with ``hint``."""
    if value != "text":
        raise unsupported(what.format(value[:40]), hint)
    return value


class TextPart(Body):
    type: str
    text: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        return text_only(value, "a content part of type {!r}", ": only text parts are (no images, audio or files)")


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    # An assistant turn's tool calls (and the legacy function call) would be part of the prompt: refused.
    tool_calls: Any = None
    function_call: Any = None

    @field_validator("tool_calls", "function_call")
    @classmethod
    def _no_calls(cls, value: Any, info: ValidationInfo) -> Any:
        return neutral_only("tool_calls", value)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ResponseFormat(Body):
    type: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        return text_only(value, "{!r}", " (only \"text\" is)")


class ChatCompletionRequest(SamplingBody):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    # Tool calling is not implemented: refused, tools included, unless tool_choice is "none".
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    tools: list[Any] | None = None
    # vLLM's chat template switches and OpenAI's legacy function calling and audio: refused unless neutral.
    add_generation_prompt: Any = None
    continue_final_message: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None

    @field_validator("messages", mode="before")
    @classmethod
    def _messages_size(cls, value: Any) -> Any:
        # Counted before each message is validated (see CompletionRequest._prompt_size).
        if isinstance(value, list) and len(value) > MAX_MESSAGES:
            raise PydanticCustomError("messages_size", "has {n} messages; a conversation takes at most {most}",
                                      {"n": len(value), "most": MAX_MESSAGES})
        return value

    @field_validator("add_generation_prompt", "continue_final_message", "functions", "function_call",
                     "modalities", "audio")
    @classmethod
    def _chat_neutral_only(cls, value: Any, info: ValidationInfo) -> Any:
        return neutral_only(info.field_name, value)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise PydanticCustomError("top_logprobs", "needs logprobs to be true (top_logprobs {n} without it "
                                                      "would return no logprobs)", {"n": value})
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_calls(cls, value):
        if value == "required" or isinstance(value, dict):
            raise unsupported("tool calling (tool_choice \"required\" or a named function)")
        return value

    @field_validator("tools")
    @classmethod
    def _tools_unused(cls, value: list | None, info: ValidationInfo) -> list | None:
        if value and info.data.get("tool_choice") != "none":
            raise unsupported("tool calling (tools are accepted only with tool_choice \"none\")")
        return value
