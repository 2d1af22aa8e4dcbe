"""Incremental detokenization with stop sequences.

Decodes a window of recent tokens so that multi-byte characters split across
byte-level tokens are held back until complete, and holds back any tail of
the text that could still become a stop sequence, so a stop sequence is
never streamed.

A stream resumed on another instance (router failover) replays the tokens
already streamed through a fresh detokenizer and drops their text: the
state after the replay is exactly the first instance's state at the break
(the bytes of a character cut in two, the tail held back for a possible
stop sequence), so the resumed stream's first text is what the first
instance still held, and the two streams join byte for byte at any break.
"""

from __future__ import annotations

from collections.abc import Sequence


class Detokenizer:
    """One sequence's incremental text (engine thread): :meth:`add` a token,
    get the text now safe to stream; :meth:`flush` the rest at the end.

    ``resumed``: tokens generated (and their text streamed) elsewhere before
    this stream took over; they are replayed, their text not returned again.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = (),
                 resumed: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_ids)
        # Start the window a few tokens back so the first token's text is decoded in context.
        self._prefix = max(0, len(self._ids) - 4)
        self._read = len(self._ids)
        self._stop = tuple(s for s in stop if s)
        self.text = ""       # generated text so far (stop match excluded)
        self._emitted = 0    # characters of self.text already returned
        self.stopped = False
        for token_id in resumed:
            self.add(token_id)  # the text the first instance streamed: the client has it

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Appends a token; returns the text that is now safe to stream."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
        if self._stop:
            self._check_stop()
        return self._take(final=self.stopped)

    def flush(self) -> str:
        """Whatever is held back, at the end of the stream."""
        return self._take(final=True)

    def _check_stop(self) -> None:
        window_start = max(0, self._emitted - max(len(s) for s in self._stop))
        hits = [i for s in self._stop if (i := self.text.find(s, window_start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _holdback(self) -> int:
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _take(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._holdback()
        out = self.text[self._emitted:end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return out
