"""The OpenAI API's request bodies, typed (pydantic): ``/v1/completions`` and
``/v1/chat/completions``. Unknown fields are ignored, as the reference server
ignores them; a wrong type or a value out of range is a 400 naming the field.
Types are strict, as the reference's are: ``"max_tokens": "5"`` is refused,
not coerced (pydantic's strict mode; a JSON integer still counts as a number
where a float is asked).
llmesh's extensions: ``top_k``, ``ignore_eos`` and ``priority`` (a priority
class: batch, normal, interactive)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Most independent choices one request may ask for.
MAX_N = 16
#: Most alternatives per token (OpenAI's bound).
MAX_TOP_LOGPROBS = 20
#: The contract carries token ids as int32: a larger id is out of every vocabulary.
TokenId = Annotated[int, Field(ge=0, lt=2 ** 31)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class SamplingBody(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    #: Extension (vLLM's): the k most likely tokens; 0 or -1: off.
    top_k: int | None = Field(None, ge=-1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2 ** 64)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    #: Extension (vLLM's): keep generating past end-of-sequence tokens.
    ignore_eos: bool = False
    #: Extension: llmesh's priority class (the router's pool and the target's queue order).
    priority: Literal["batch", "normal", "interactive"] | None = None


class CompletionRequest(SamplingBody):
    """``POST /v1/completions``."""

    #: A string, strings, token ids, or lists of token ids (one choice set per prompt).
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingBody):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
