"""The bytes each token stands for (pure): what a log-probability entry
carries beside the token's text, which shows a token holding part of a
multi-byte character as U+FFFD."""

from __future__ import annotations

import re
from functools import lru_cache

#: A SentencePiece byte-fallback piece: one raw byte.
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed (transformers' ``bytes_to_unicode``):
    printable bytes stand for themselves, the others for characters from U+0100 on."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tokenizer, ids: list[int], texts: list[str]) -> list[bytes]:
    """The bytes of each of ``ids`` (``texts``: each decoded alone): the text's
    UTF-8 where it has no U+FFFD; else the piece's raw bytes (a byte-level BPE
    piece, or a SentencePiece ``<0xNN>`` piece); else the text's UTF-8, U+FFFD
    and all (a tokenizer of neither kind)."""
    out: list[bytes] = []
    pieces = None
    for i, text in enumerate(texts):
        if "\ufffd" not in text:
            out.append(text.encode("utf-8"))
            continue
        if pieces is None:
            pieces = tokenizer.convert_ids_to_tokens(list(ids))
        piece, decoder = pieces[i] or "", byte_decoder()
        byte = BYTE_PIECE.fullmatch(piece)
        if byte:
            out.append(bytes([int(byte.group(1), 16)]))
        elif piece and all(ch in decoder for ch in piece):
            out.append(bytes(decoder[ch] for ch in piece))
        else:
            out.append(text.encode("utf-8"))
    return out
