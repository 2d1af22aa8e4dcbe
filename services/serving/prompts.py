"""Text prompts: refused by their size before tokenizing, tokenized off the event loop.

A prompt too long for the context must cost its bytes only: tokenizing 5 MB
of text (2.5 M tokens) on the event loop held a target's health checks for
6.8 s and left its memory 0.7 GB higher. :func:`max_token_bytes` reads from
the tokenizer the most bytes of text one token can stand for, so a text of
more than ``max_context × max_token_bytes`` bytes needs more than
``max_context`` tokens and is refused (OutOfRange) without being tokenized;
what may fit is tokenized on a worker thread, unless it is short
(:data:`INLINE_CHARS`): a worker thread's hand-off cost a request 0.6-0.7 ms
on 2 cores, where tokenizing a sentence on the loop costs ~45 us.
"""

from __future__ import annotations

import asyncio

from services.common.errors import InvalidArgument, OutOfRange


def max_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes of text one token of ``tokenizer`` stands for: the
    longest single-token decoding (special tokens included), plus one for the
    leading space a SentencePiece decoder strips from a lone token. A
    byte-level token that holds part of a character decodes to U+FFFD (3
    bytes), more than the byte it stands for, so the figure never falls short
    for byte-level BPE or SentencePiece. (A normalizer that deletes text could
    make a prompt shorter than its bytes say; llmesh's tokenizers have none.)
    Costs one decode per vocabulary entry; call it once, off the event loop."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return max((len(t.encode("utf-8")) for t in texts), default=1) + 1


#: Texts up to this many characters are tokenized on the event loop (a few tens of microseconds for a fast
#: tokenizer, less than the hand-off to a worker thread); longer ones on a worker thread.
INLINE_CHARS = 2048


class PromptEncoder:
    """Tokenizes text prompts for a model whose sequences hold ``max_context`` tokens."""

    def __init__(self, tokenizer, max_context: int, bytes_per_token: int, inline_chars: int = INLINE_CHARS) -> None:
        self._tokenizer = tokenizer
        self.max_context = max_context
        #: Texts up to this many characters are tokenized on the event loop.
        self.inline_chars = inline_chars
        #: Longest text, in bytes of UTF-8, that could fit the context.
        self.max_bytes = max_context * bytes_per_token

    def check_size(self, text: str, field: str = "prompt.text") -> None:
        """OutOfRange, naming ``field`` (the request field the text came from),
        when ``text`` cannot fit the context, whatever its tokens."""
        size = len(text) if len(text) > self.max_bytes else len(text.encode("utf-8"))
        if size > self.max_bytes:
            what = "is" if field == "prompt.text" else "makes a text (through the chat template) of"
            raise OutOfRange(field, f"{what} {size} bytes of UTF-8, more than the {self.max_bytes} bytes that "
                                    f"can fit this model's context of {self.max_context} tokens")

    async def encode(self, text: str, field: str = "prompt.text") -> list[int]:
        """Token ids of ``text`` (no special tokens added), tokenized on a worker
        thread unless it is short (``inline_chars``); OutOfRange naming
        ``field``, before tokenizing, when it cannot fit."""
        self.check_size(text, field)
        if len(text) <= self.inline_chars:
            return self._tokenizer.encode(text, add_special_tokens=False, verbose=False)
        return await asyncio.to_thread(self._tokenizer.encode, text, add_special_tokens=False, verbose=False)


def chat_text(tokenizer, model_name: str, chat) -> str:
    """The text of a conversation (a ``ChatMessages``: its ``messages`` with
    ``role`` and ``content``) through the tokenizer's chat template, with the
    generation prompt appended (transformers' ``apply_chat_template``, Jinja).
    InvalidArgument when the model has no chat template or the template
    refuses the conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument("prompt.chat", f"model {model_name!r} has no chat template (its tokenizer_config.json "
                                             "or chat_template.jinja names none): send a text prompt instead "
                                             "(/v1/completions)")
    messages = [{"role": m.role, "content": m.content} for m in chat.messages]
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a template's own refusal (raise_exception) is the request's fault
        raise InvalidArgument("prompt.chat", f"the chat template of {model_name!r} refused the conversation: "
                                             f"{str(exc)[:200]}") from None
