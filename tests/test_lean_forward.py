"""The lean Llama forward against transformers' path: the same logits, bit for bit."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from services.engine import cpu_linear, lean_llama
from services.engine.model_runner import ForwardRow, ModelRunner

PROMPTS = [[5, 9, 13, 2, 77, 31, 8], [40, 41, 42], [100, 7, 7, 7, 12, 250, 3, 9, 61, 18, 4]]


def _config(**overrides) -> LlamaConfig:
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    return LlamaConfig(**{**base, **overrides})


def _model(config, seed: int = 0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(copy.deepcopy(config)).eval()  # a config each: it names the runner's attention


def _runner(model_or_config, lean: bool, prepack: bool = False, **kw) -> ModelRunner:
    model = _model(model_or_config) if isinstance(model_or_config, LlamaConfig) else model_or_config
    return ModelRunner(model, num_blocks=12, block_size=4, max_len=64, prepack=prepack, prepack_min_elements=0,
                       prepack_measure=False, lean=lean, **kw)


def _steps() -> list[list[ForwardRow]]:
    """A mixed-length prefill batch, a decode batch, a batch of a decode and two
    verify rows (keep > 1), then a lone decode: what an engine runs."""
    tables = [[9, 2, 6], [5, 3], [7, 1, 11, 10]]
    prefill = [ForwardRow(t, 0, p[:-1], keep=1 + i) for i, (t, p) in enumerate(zip(tables, PROMPTS))]
    decode = [ForwardRow(t, len(p) - 1, p[-1:]) for t, p in zip(tables, PROMPTS)]
    verify = [ForwardRow(tables[0], len(PROMPTS[0]), [33]),
              ForwardRow(tables[1], len(PROMPTS[1]), [34, 35, 36, 37], keep=4),
              ForwardRow(tables[2], len(PROMPTS[2]), [38, 39], keep=2)]
    lone = [ForwardRow(tables[1], len(PROMPTS[1]) + 4, [12])]
    return [prefill, decode, verify, lone]


def _kernel_swapped(model):
    """What kernels' ``kernelize`` does to a layer: its forward replaced on the instance."""
    norm = model.model.layers[0].input_layernorm
    norm.forward = lambda hidden: type(norm).forward(norm, hidden)
    return model


def _assert_same_logits(config_or_model, prepack: bool = False, **kw) -> ModelRunner:
    twin = config_or_model if isinstance(config_or_model, LlamaConfig) else _clone(config_or_model)
    hf_runner = _runner(config_or_model, lean=False, prepack=prepack, **kw)
    lean_runner = _runner(twin, lean=True, prepack=prepack, **kw)
    assert hf_runner.lean is None
    assert lean_runner.lean is not None, "the lean forward should apply to this model"
    for rows in _steps():
        want, got = hf_runner.forward(rows), lean_runner.forward(rows)
        assert [g.shape for g in got] == [w.shape for w in want]
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    return lean_runner


def _clone(model):
    return copy.deepcopy(model)  # weights, buffers and config: before any runner names its attention in it


@pytest.mark.parametrize("prepack", [False, True, "both layouts"])
def test_lean_logits_equal_transformers_bit_for_bit(prepack):
    if prepack and not cpu_linear.supported():
        pytest.skip("oneDNN packed linears are not available in this torch build")
    # Both layouts, packed from 4 rows: the steps' decode (3 rows) and lone decode take F.linear, the
    # prefill and the verify step (7 rows) the packed weights.
    dual = {"prepack_dual_from": 4} if prepack == "both layouts" else {}
    runner = _assert_same_logits(_config(), prepack=bool(prepack), **dual)
    assert (runner.prepacked > 0) == bool(prepack)
    # q/k/v and gate/up run as one product each (packed-only layers stay apart), with no weight copied.
    layers = runner.model.model.layers
    assert runner.lean.fused == (0 if prepack is True else 2 * len(layers))
    if prepack is not True:
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            shared = {p.weight.untyped_storage().data_ptr() for p in (a.q_proj, a.k_proj, a.v_proj)}
            assert len(shared) == 1 and m.gate_proj.weight.untyped_storage().data_ptr() == \
                m.up_proj.weight.untyped_storage().data_ptr()
    if dual:
        assert type(layers[0].self_attn.q_proj) is cpu_linear.DualLinear


@pytest.mark.parametrize("overrides", [
    dict(tie_word_embeddings=True),
    dict(attention_bias=True, mlp_bias=True),
    dict(num_key_value_heads=4, head_dim=8),  # MHA, a head_dim that is not hidden // heads
    dict(rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}),
    dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
    # head_dim 32 and 64: cos/sin come from the lean forward's table (see test_rope_table_...).
    dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32),
    dict(num_attention_heads=2, num_key_value_heads=2, head_dim=32,
         rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64),
    # 30 x 4-byte rows: k's rows would start off a 64-byte boundary, so q/k/v stay apart; gate/up fuse.
    dict(hidden_size=30, num_attention_heads=3, num_key_value_heads=3, intermediate_size=48),
], ids=["tied", "bias", "mha-head-dim", "rope-linear", "rope-llama3", "rope-dynamic", "gqa-head-dim-32",
        "rope-llama3-head-dim-32", "head-dim-64", "unaligned"])
def test_lean_logits_equal_transformers_for_config_variants(overrides):
    runner = _assert_same_logits(_config(**overrides))
    per_layer = 1 if overrides.get("hidden_size") == 30 else 2
    assert runner.lean.fused == per_layer * runner.model.config.num_hidden_layers


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
], ids=["default", "linear", "dynamic"])
def test_rope_table_gives_transformers_values_at_far_positions(rope):
    """A static RoPE's cos/sin are read from a table grown past 256 and 512 positions
    (built in chunks, read for rows at unrelated positions in one batch): the logits stay
    transformers' own. A dynamic RoPE, whose frequencies change with the length, has no table."""
    config = _config(num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=1024,
                     rope_parameters=rope)
    model = _model(config)
    twin = _clone(model)

    def runner(m, lean):
        return ModelRunner(m, num_blocks=300, block_size=4, max_len=1024, prepack=False, lean=lean)

    want_runner, got_runner = runner(model, False), runner(twin, True)
    assert got_runner.lean is not None
    table, other = list(range(1, 257)), list(range(299, 256, -1))  # 1024 positions, and 172 in other blocks
    tokens = [(7 * i) % 300 for i in range(1024)]
    steps = [[ForwardRow(table, 0, tokens[:300], keep=5)],
             [ForwardRow(table, 300, tokens[300:303], keep=3), ForwardRow(other, 0, tokens[:7])],
             [ForwardRow(table, 303, tokens[303:1020]), ForwardRow(other, 7, tokens[7:9], keep=2)],
             [ForwardRow(table, 1020, tokens[1020:1022], keep=2)]]
    for rows in steps:
        for g, w in zip(got_runner.forward(rows), want_runner.forward(rows)):
            assert torch.equal(g, w)
    lean = got_runner.lean
    if rope["rope_type"] == "dynamic":
        assert lean._table is None
    else:
        assert lean._table is not None and lean._table[0].shape[0] == 1024


def test_rope_table_covers_padding_past_the_context():
    """A short row in a batch with a wider one is padded to positions past any token's
    (up to start + width - 1): the table grows to cover them (here past its first 256)."""
    config = _config(num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=1024)
    model = _model(config)
    want_runner = ModelRunner(model, num_blocks=300, block_size=4, max_len=1024, prepack=False, lean=False)
    got_runner = ModelRunner(_clone(model), num_blocks=300, block_size=4, max_len=1024, prepack=False, lean=True)
    table, other = list(range(1, 257)), list(range(299, 256, -1))
    tokens = [(5 * i) % 300 for i in range(300)]
    steps = [[ForwardRow(table, 0, tokens[:250])],
             [ForwardRow(table, 250, tokens[250:251]), ForwardRow(other, 0, tokens[:10], keep=10)]]
    for rows in steps:
        for g, w in zip(got_runner.forward(rows), want_runner.forward(rows)):
            assert torch.equal(g, w)
    assert got_runner.lean._table[0].shape[0] == 512


def test_lean_on_tiny_test_models_bf16(tiny_models):
    """The session's tiny target, loaded by from_pretrained in bfloat16 (the norm's dtype casts matter)."""
    model = LlamaForCausalLM.from_pretrained(tiny_models.target, dtype=torch.bfloat16).eval()
    _assert_same_logits(model)


@pytest.mark.parametrize("model_fn, why", [
    (lambda: _kernel_swapped(_model(_config())), "forward replaced"),
    (lambda: MistralForCausalLM(MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=96,
                                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64)).eval(),
     "is not LlamaForCausalLM"),
], ids=["hub-kernel", "mistral"])
def test_unsupported_models_keep_transformers_path_and_say_so_once(model_fn, why, caplog):
    model = model_fn()
    reference = _clone(model)
    with caplog.at_level(logging.INFO, logger="services.engine.model_runner"):
        runner = _runner(model, lean=True)
    assert runner.lean is None
    said = [r.getMessage() for r in caplog.records if "lean one does not apply" in r.getMessage()]
    assert len(said) == 1 and why in said[0]
    want = _runner(reference, lean=False)
    for rows in _steps():
        assert all(torch.equal(g, w) for g, w in zip(runner.forward(rows), want.forward(rows)))


def test_a_lean_forward_that_disagrees_on_the_probe_is_not_used(monkeypatch, caplog):
    """Never a wrong answer: logits that differ from transformers' by one ulp keep transformers' path."""
    head = lean_llama.LeanLlama.head
    monkeypatch.setattr(lean_llama.LeanLlama, "head", lambda self, h: torch.nextafter(head(self, h), head(self, h) + 1))
    with caplog.at_level(logging.INFO, logger="services.engine.model_runner"):
        runner = _runner(_config(), lean=True)
    assert runner.lean is None
    assert any("differ from transformers'" in r.getMessage() for r in caplog.records)


def test_a_fused_product_that_disagrees_falls_back_to_separate_products(monkeypatch, caplog):
    """Fusing is exact where the kernel computes each output column alike whatever the
    matrix's height; where a CPU's kernel does not, the probe keeps the separate products."""
    fused = lean_llama._fused

    def off_by_one_ulp(modules):
        product = fused(modules)
        return None if product is None else (lambda x: torch.nextafter(product(x), product(x) + 1))

    monkeypatch.setattr(lean_llama, "_fused", off_by_one_ulp)
    with caplog.at_level(logging.INFO, logger="services.engine.model_runner"):
        runner = _runner(_config(), lean=True)
    assert runner.lean is not None and runner.lean.fused == 0
    assert any("0 of 4" in r.getMessage() for r in caplog.records)
    want = _runner(_config(), lean=False)
    for rows in _steps():
        assert all(torch.equal(g, w) for g, w in zip(runner.forward(rows), want.forward(rows)))


def test_pipeline_stage_keeps_transformers_path():
    assert "pipeline stage" in lean_llama.unsupported(_model(_config()), range(1, 2))


def test_lean_forward_flag_reaches_the_runner(tiny_models, monkeypatch):
    """The flag decides whether the lean forward is tried; whether it is then used is the probe's call,
    which differs by machine (2026-12-02, an AVX512 VM without AMX: its logits were not bit-equal to
    transformers' on the tiny draft, so it was rightly not used), and is tested above."""
    from services.draft.config import DraftConfig
    from services.engine.build import build_engine
    from services.engine.model_runner import ModelRunner
    from services.engine.settings import EngineSettings

    assert DraftConfig.from_args([], env={}).lean_forward is True
    config = DraftConfig.from_args(["--lean-forward", "false"], env={})
    assert config.lean_forward is False
    tried = []
    probe = ModelRunner._lean_forward
    monkeypatch.setattr(ModelRunner, "_lean_forward", lambda self: tried.append(True) or probe(self))
    for lean in (True, False):
        tried.clear()
        runner = build_engine(str(tiny_models.draft), EngineSettings(), device="cpu", lean=lean,
                              num_kv_blocks=8).engine.runner
        assert bool(tried) == lean
        assert lean or runner.lean is None
