"""Fast checks of the offline model build pieces (no full build: that takes minutes)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from services.models import corpus
from services.models.build import BuildPlan, recipe
from services.models.grow import grow_llama, layer_placement
from services.models.measure import argmax_agreement
from services.models.tokenizer import EOS_TOKEN, train_tokenizer
from services.models.train import greedy_continuations, greedy_with_topk, teacher_sequences

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 5,
    "Return a new list containing all items from the iterable in ascending order.\n" * 3,
    "    def f(x):\n        return x  # indented code, tabs\tand  double  spaces\n",
    "Unicode survives byte-level BPE: caf\u00e9, na\u00efve, \u2713, \U0001f600.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 4, vocab_size=320)


@pytest.fixture(scope="module")
def documents():
    return corpus.load_documents()


@pytest.mark.parametrize(
    "text",
    TEXTS + ["", " leading space", "trailing space ", "new\n\nlines\r\n", "unseen bytes \x00\x7f \u4e2d\u6587 \u00ff"],
)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id not in ids


def test_tokenizer_special_token(tokenizer):
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.eos_token_id == 0
    assert tokenizer.bos_token_id == tokenizer.pad_token_id == tokenizer.unk_token_id == 0
    assert tokenizer.convert_ids_to_tokens(0) == EOS_TOKEN
    # No bos/eos added: "hello" is only its BPE tokens.
    ids = tokenizer("hello")["input_ids"]
    assert ids == tokenizer.backend_tokenizer.encode("hello").ids
    assert 0 not in ids
    assert len(tokenizer) <= 320


def test_tokenizer_saves_and_loads(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = TEXTS[2] + TEXTS[3]
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.eos_token_id == 0 and loaded.pad_token_id == 0
    assert loaded.padding_side == "left"


def test_tokenizer_rejects_too_small_vocab():
    with pytest.raises(ValueError):
        train_tokenizer(TEXTS, vocab_size=100)


def test_split_is_disjoint_and_deterministic(documents):
    train, heldout = corpus.split_documents(documents)
    assert train and heldout
    assert {d.id for d in train}.isdisjoint({d.id for d in heldout})
    assert {d.text for d in train}.isdisjoint({d.text for d in heldout})
    assert len(train) + len(heldout) == len(documents)
    # Held-out share close to HELDOUT_PERCENT.
    assert 0.05 < len(heldout) / len(documents) < 0.15
    assert all(corpus.is_heldout(d.id) for d in heldout)


def test_heldout_prompts_deterministic_and_unseen(documents):
    a = corpus.heldout_prompts(64, seed=0, documents=documents)
    b = corpus.heldout_prompts(64, seed=0, documents=documents)
    c = corpus.heldout_prompts(64, seed=1, documents=documents)
    assert a == b
    assert a != c
    assert len(a) == 64 and len(set(a)) == 64
    assert all(8 <= len(p.split()) <= 16 for p in a)
    train, _ = corpus.split_documents(documents)
    train_text = " ".join(" ".join(d.text.split()) for d in train)
    for prompt in a + c:
        assert prompt not in train_text


def _tiny_llama(seed: int = 0, tie: bool = True, kv_heads: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        # Non-trivial norm weights, so the RMSNorm rescaling is really exercised.
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tie,kv_heads,hidden,layers", [(True, 4, 64, 4), (False, 2, 48, 5), (True, 4, 128, 3)])
def test_grow_llama_keeps_logits(tie, kv_heads, hidden, layers):
    small = _tiny_llama(tie=tie, kv_heads=kv_heads)
    large = grow_llama(small, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=150, seed=1)
    assert large.config.hidden_size == hidden and large.config.num_hidden_layers == layers
    assert sum(p.numel() for p in large.parameters()) > 2 * sum(p.numel() for p in small.parameters())
    ids = torch.randint(1, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(large(input_ids=ids).logits, small(input_ids=ids).logits, atol=1e-4, rtol=0)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    assert greedy_continuations(large, prompts, 8, 0) == greedy_continuations(small, prompts, 8, 0)


def test_grow_llama_rejects_smaller_shape():
    with pytest.raises(ValueError):
        grow_llama(_tiny_llama(), hidden_size=16, num_hidden_layers=2, intermediate_size=64)


def test_layer_placement_spreads_in_order():
    assert layer_placement(2, 2) == [0, 1]
    assert layer_placement(4, 6) == [0, 1, 3, 4]
    assert layer_placement(2, 6) == [0, 3]


def test_teacher_data_lines_up_with_greedy_tokens():
    model = _tiny_llama()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    conts, logp, idx = greedy_with_topk(model, prompts, 6, 0, k=4)
    assert conts == greedy_continuations(model, prompts, 6, 0)
    ids, mask, vals, idxs = teacher_sequences(prompts, conts, logp, idx, 0)
    for i, (p, c) in enumerate(zip(prompts, conts)):
        pos = mask[i].nonzero().flatten().tolist()
        assert pos == list(range(len(p) - 1, len(p) - 1 + len(c)))
        # The teacher's argmax at each masked position is the next token in ids.
        assert idxs[i, pos, 0].tolist() == ids[i, [q + 1 for q in pos]].tolist()


def test_argmax_agreement_by_range():
    model = _tiny_llama()
    other = _tiny_llama(seed=5, tie=False)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    conts = greedy_continuations(model, prompts, 12, 0)
    same = argmax_agreement(model, model, prompts, conts, ranges=[(0, 4), (4, 12)])
    assert same["agreement"] == 1.0 and same["target_consistency"] == 1.0
    assert same["positions"] == 24 and same["by_range"] == {"0-4": 1.0, "4-12": 1.0}
    diff = argmax_agreement(other, model, prompts, conts, ranges=[(0, 12)])
    assert diff["by_range"]["0-12"] == pytest.approx(diff["agreement"])
    assert diff["agreement"] < 1.0


def test_recipe_round_trips_and_tracks_seed_and_plan():
    plan = BuildPlan()
    for name in ("target", "draft", "target-large"):
        r = recipe(plan, 0, name)
        assert json.loads(json.dumps(r)) == r  # compared with the JSON report on disk
        assert recipe(plan, 1, name) != r
    smaller = dataclasses.replace(plan, draft=dataclasses.replace(plan.draft, hidden_size=32))
    assert recipe(smaller, 0, "draft") != recipe(plan, 0, "draft")
    assert recipe(smaller, 0, "target") == recipe(plan, 0, "target")


def test_bf16_autocast_follows_the_cpu_unless_set(monkeypatch):
    """Emulated bf16 made training ~28x slower on an AVX2-only CPU: autocast
    only where the CPU has bf16 in hardware, or where the config says so."""
    from services.models import train

    for has_bf16 in (True, False):
        monkeypatch.setattr(train, "native_bf16", lambda: has_bf16)
        assert train.TrainConfig(steps=1).use_bf16 is has_bf16
        assert train.TrainConfig(steps=1, bf16=False).use_bf16 is False
        assert train.TrainConfig(steps=1, bf16=True).use_bf16 is True


def test_training_reports_whether_it_used_bf16(monkeypatch):
    from services.models import train

    monkeypatch.setattr(train, "native_bf16", lambda: False)
    model = torch.nn.Linear(4, 4)
    seen = []

    def loss(step):
        seen.append(torch.is_autocast_enabled("cpu"))
        return model(torch.ones(2, 4)).pow(2).mean()

    stats = train._optimise(model, train.TrainConfig(steps=2, warmup_steps=1), loss, progress=False, desc="t")
    assert stats["bf16_autocast"] is False and seen == [False, False]


def test_no_bf16_where_torch_runs_avx2_kernels(monkeypatch):
    from services.models import train

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert train.native_bf16() is False


def test_a_kept_model_without_a_chat_template_gets_one(tokenizer, tmp_path):
    """Models built before the tokenizer had a chat template answer chat requests
    after `llmesh models build` keeps them (no rebuild)."""
    from services.models.build import _ensure_chat_template

    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert not getattr(AutoTokenizer.from_pretrained(str(tmp_path)), "chat_template", None)
    assert _ensure_chat_template(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = loaded.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "user: hi\nassistant:"
    assert not _ensure_chat_template(tmp_path)  # once
