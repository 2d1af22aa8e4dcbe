"""A stream resumed on another instance has the unbroken stream's text, byte
for byte, whatever the break point: inside a multi-byte character (its bytes
in two byte-level tokens), or while text is held back for a stop sequence
that may be starting.

The streams come from a "scripted" model: a real Llama checkpoint whose
layers add nothing to the residual stream (``o_proj`` and ``down_proj`` are
zero), whose embeddings of the script's tokens are orthogonal and whose
output head maps each script token to the next one, so greedy decoding
follows the script exactly. The target service loads it like any checkpoint.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import GenerationConfig, LlamaForCausalLM

from services.common.stubs import generation_pb2 as gen
from services.engine.detokenizer import Detokenizer
from tests.conftest import tiny_llama_config
from tests.router_helpers import FakeTarget, collect, fake_target, register, running_router, start_target, \
    wait_routable

#: Streams whose tokens (in the tests' byte-level tokenizer) are all distinct,
#: as a successor table needs, with their stop sequences: characters of two,
#: three and four bytes split across tokens (“ is two tokens, as it is in the
#: built tokenizer), text held back as a possible stop sequence (" n" for
#: " n!", "S", "ST", "STO" for "STOP", "—" for "—Z") and then released or
#: matched.
STREAMS = [
    ("Ça “🙂", ()),
    ("a“ noSTOP", ("STOP", " n!")),
    ("xé—Zq", ("—Z",)),
]
PROMPT = "Q:"


def expected_text(text: str, stop) -> str:
    hits = [text.index(s) for s in stop if s in text]
    return text[: min(hits)] if hits else text


def save_scripted_model(path, tokenizer, chain: list[int], hidden: int = 32) -> None:
    """A checkpoint whose greedy continuation of ``chain[i]`` is ``chain[i + 1]`` (distinct tokens)."""
    assert len(set(chain)) == len(chain) <= hidden, f"the chain repeats a token: {chain}"
    config = tiny_llama_config(len(tokenizer), hidden, 1)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    basis = torch.linalg.qr(torch.randn(hidden, hidden)).Q.T  # orthonormal rows
    with torch.no_grad():
        for layer in model.model.layers:  # no layer adds to the residual stream: it is the last embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.zero_()
        for k, (a, b) in enumerate(zip(chain, chain[1:])):
            embed[a] = basis[k] * hidden ** 0.5  # RMS 1: the final norm leaves it as it is
            head[b] = basis[k] * 10.0 / hidden ** 0.5  # logit 10 for b, 0 for every other token
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _detok(tokenizer, stop, resumed=()):
    return Detokenizer(tokenizer, tokenizer.encode(PROMPT, add_special_tokens=False), tuple(stop), resumed=resumed)


def unbroken(tokenizer, ids, stop) -> tuple[str, int]:
    """The whole stream's text and how many of ``ids`` it took (it ends at a stop sequence)."""
    detok, out = _detok(tokenizer, stop), []
    for used, t in enumerate(ids, 1):
        out.append(detok.add(t))
        if detok.stopped:
            return "".join(out) + detok.flush(), used
    return "".join(out) + detok.flush(), len(ids)


def broken(tokenizer, ids, stop, k) -> tuple[str, str]:
    """What the first instance streamed of ``ids[:k]`` before it broke (nothing
    flushed), and what a second one streams resuming after them."""
    first = _detok(tokenizer, stop)
    before = "".join(first.add(t) for t in ids[:k])
    second, after = _detok(tokenizer, stop, resumed=ids[:k]), []
    for t in ids[k:]:
        after.append(second.add(t))
        if second.stopped:
            break
    return before, "".join(after) + second.flush()


@pytest.mark.parametrize("text, stop", STREAMS)
def test_a_resumed_detokenizer_streams_what_the_first_one_held_back_at_every_break(tiny_models, text, stop):
    tok = tiny_models.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    whole, used = unbroken(tok, ids, stop)
    assert whole == expected_text(text, stop)
    for k in range(1, used):
        before, after = broken(tok, ids, stop, k)
        assert (before + after).encode() == whole.encode(), f"break after {k} tokens: {before!r} + {after!r}"
    # The breaks include ones inside a character, and (with stop sequences) ones in a held-back tail.
    assert any(tok.decode(ids[:k]).endswith("\ufffd") for k in range(1, used))
    if stop:
        assert any(not tok.decode(ids[:k]).endswith("\ufffd")
                   and len(broken(tok, ids, stop, k)[0]) < len(tok.decode(ids[:k])) for k in range(1, used))


def scripted_request(start: int, stop, n: int) -> gen.GenerateRequest:
    req = gen.GenerateRequest(prompt=gen.Prompt(tokens=gen.TokenIds(ids=[start])),
                              sampling=gen.SamplingParams(max_new_tokens=n, ignore_eos=True, stop=list(stop)))
    req.speculation.enabled = False
    return req


@pytest.mark.parametrize("text, stop", STREAMS)
async def test_resumed_streams_through_the_router_join_byte_for_byte_at_every_break(tiny_models, tmp_path, text,
                                                                                    stop):
    tok = tiny_models.tokenizer
    script = tok.encode(text, add_special_tokens=False)
    start = next(t for t in range(1, len(tok)) if t not in script)
    save_scripted_model(tmp_path, tok, [start, *script])
    expected = expected_text(text, stop)
    target = await start_target(tiny_models, model=str(tmp_path))
    try:
        async with contextlib.AsyncExitStack() as stack:
            # The same target behind a proxy that breaks, and as itself: a resumed
            # stream goes to the other instance id, with resume_tokens.
            breaking = FakeTarget(upstream=target.address)
            _, address = await stack.enter_async_context(fake_target(breaking))
            # It breaks every stream sent to it: not ejected for that here.
            _, stub, _ = await stack.enter_async_context(running_router(eject_after_failures=0))
            await register(stub, "1-breaking", address)
            await register(stub, "2-real", target.address)
            await wait_routable(stub, ["1-breaking", "2-real"])
            whole_tokens, whole = await collect(stub, scripted_request(start, stop, len(script)))
            assert "".join(c.text for c in whole) == expected and whole_tokens == script[:len(whole_tokens)]
            resumed = 0
            for k in range(1, len(whole_tokens)):
                breaking.break_after = k
                # A break marks the instance unreachable until its health is looked at again.
                await wait_routable(stub, ["1-breaking", "2-real"])
                for _ in range(2):  # round robin: one of two requests starts on the breaking instance
                    tokens, chunks = await collect(stub, scripted_request(start, stop, len(script)))
                    got = "".join(c.text for c in chunks)
                    assert got.encode() == expected.encode(), f"break after {k} tokens: {got!r}"
                    assert tokens == whole_tokens and chunks[-1].finish_reason == whole[-1].finish_reason
                    if chunks[0].instance_id == "1-breaking":
                        resumed += 1
                        assert chunks[-1].instance_id == "2-real"
                        break
            assert resumed == len(whole_tokens) - 1
    finally:
        await target.stop(0)
