"""Incremental detokenization and stop sequences, with the tiny byte-level tokenizer."""

from __future__ import annotations

from services.engine.detokenizer import Detokenizer


def stream(tokenizer, text, stop=(), prompt="Q:"):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = Detokenizer(tokenizer, tokenizer.encode(prompt, add_special_tokens=False), tuple(stop))
    pieces = []
    for t in ids:
        pieces.append(detok.add(t))
        if detok.stopped:
            break
    pieces.append(detok.flush())
    return pieces, detok


def test_streamed_pieces_join_to_the_text(tiny_models):
    text = "Hello, wörld — ünïcode ✓ and emoji 🙂 survive byte-level splits."
    pieces, _ = stream(tiny_models.tokenizer, text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_sequence_is_never_streamed(tiny_models):
    text = "first line\nsecond line END third"
    pieces, detok = stream(tiny_models.tokenizer, text, stop=["END"])
    assert detok.stopped
    assert "".join(pieces) == "first line\nsecond line "
    assert not any("E" in p for p in pieces)


def test_partial_stop_prefix_is_released_when_it_does_not_match(tiny_models):
    text = "an ENVELOPE, not the ENd"
    pieces, detok = stream(tiny_models.tokenizer, text, stop=["END"])
    assert not detok.stopped
    assert "".join(pieces) == text
