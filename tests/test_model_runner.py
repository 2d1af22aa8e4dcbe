"""The model runner against stock transformers, with and without packed weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from services.engine import cpu_linear
from services.engine.model_runner import ForwardRow, ModelRunner

PROMPTS = [[5, 9, 13, 2, 77, 31, 8], [40, 41, 42], [100, 7, 7, 7, 12, 250, 3, 9, 61, 18, 4]]


def stock_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("prepack", [False, True, "both layouts"])
def test_mixed_prefill_decode_and_verify_rows_match_stock_transformers(tiny_models, prepack):
    reference = LlamaForCausalLM.from_pretrained(tiny_models.target).eval()
    runner = ModelRunner(LlamaForCausalLM.from_pretrained(tiny_models.target).eval(), num_blocks=12, block_size=4,
                         max_len=64, prepack=bool(prepack), prepack_min_elements=0,  # tiny layers: pack them all anyway
                         prepack_measure=False, prepack_dual_from=4 if prepack == "both layouts" else None)
    assert (runner.prepacked > 0) == (bool(prepack) and cpu_linear.supported())
    # Block tables in no order, interleaved between rows, and partly past what a row reads.
    tables = [[9, 2], [5, 3], [7, 1, 11]]
    # Prefill all three prompts but the last token in one step.
    runner.forward([ForwardRow(t, 0, p[:-1]) for t, p in zip(tables, PROMPTS)])
    # One step: a decode row, a 4-token verify row (all logits kept) and a one-token row.
    extra = [33, 34, 35]
    rows = [ForwardRow(tables[0], len(PROMPTS[0]) - 1, PROMPTS[0][-1:]),
            ForwardRow(tables[1], len(PROMPTS[1]) - 1, PROMPTS[1][-1:] + extra, keep=4),
            ForwardRow(tables[2], len(PROMPTS[2]) - 1, PROMPTS[2][-1:])]
    got = runner.forward(rows)
    want = [stock_logits(reference, PROMPTS[0])[-1:], stock_logits(reference, PROMPTS[1] + extra)[-4:],
            stock_logits(reference, PROMPTS[2])[-1:]]
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)
        assert g.argmax(-1).tolist() == w.argmax(-1).tolist()


def test_packing_replaces_every_linear_and_keeps_its_output():
    if not cpu_linear.supported():
        pytest.skip("oneDNN packed linears are not available in this torch build")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 200, bias=False)))
    x = torch.randn(2, 5, 96)
    with torch.inference_mode():
        want = model(x)
        weight = model[0].weight.detach().clone()
        assert cpu_linear.weight_layout(model) == "plain"
        assert cpu_linear.prepack_linears(model, min_elements=0, measure=False) == 2
        assert not any(type(m) is nn.Linear for m in model.modules())
        assert cpu_linear.weight_layout(model) == "packed"
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        for rows in (1, 3, 17):  # any number of rows, not only the packing hint
            y = torch.randn(rows, 96)
            torch.testing.assert_close(model[0](y), F.linear(y, weight, model[0].bias), atol=1e-5, rtol=1e-5)


def test_packing_leaves_unsupported_dtypes_alone():
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.float16)
    assert cpu_linear.prepack_linears(model, min_elements=0, measure=False) == 0  # not for size: for its dtype
    assert type(model[0]) is nn.Linear


def test_small_weights_stay_unpacked():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 128))
    assert cpu_linear.prepack_linears(model, min_elements=64 * 128, measure=False) == (1 if cpu_linear.supported() else 0)
    assert type(model[0]) is nn.Linear


def test_packing_is_skipped_where_it_is_slower_on_this_cpu(monkeypatch):
    """What pays depends on the CPU's kernels: the start-up timing decides."""
    if not cpu_linear.supported():
        pytest.skip("oneDNN packed linears are not available in this torch build")
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 128))
    monkeypatch.setattr(cpu_linear, "packing_ratios", lambda layer: {1: 1.6, 4: 1.3, 8: 1.2})
    assert cpu_linear.prepack_linears(model, min_elements=0) == 0
    assert all(type(m) is nn.Linear for m in model)
    monkeypatch.setattr(cpu_linear, "packing_ratios", lambda layer: {1: 0.9, 4: 0.6, 8: 0.5})
    assert cpu_linear.prepack_linears(model, min_elements=0) == 2
    assert all(type(m) is cpu_linear.PackedLinear for m in model)


def test_both_layouts_are_kept_where_packing_pays_only_from_some_row_count(monkeypatch):
    """The AVX512/AMX build machine (2026-12-01): packed 1.21x plain on one row, 0.6x from four rows on."""
    if not cpu_linear.supported():
        pytest.skip("oneDNN packed linears are not available in this torch build")
    ratios = {1: 1.21, 2: 1.2, 3: 1.0, 4: 0.61, 5: 0.6, 6: 0.6, 8: 0.5}
    assert cpu_linear.packed_from(ratios) == 4
    assert cpu_linear.packed_from({**ratios, 5: 0.97}) == 6  # from where it pays at every count after
    assert cpu_linear.packed_from({**ratios, 8: 1.0}) is None
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 128))
    monkeypatch.setattr(cpu_linear, "packing_ratios", lambda layer: ratios)
    assert cpu_linear.prepack_linears(model, min_elements=0) == 2
    layer = model[1]
    assert type(layer) is cpu_linear.DualLinear and layer.packed_from == 4
    assert cpu_linear.weight_layout(model) == "both, packed from 4 rows"  # what GetInfo and the bench report
    # A little slower on one row (1.06x) is still slower: both layouts, not packed outright.
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 128))
    monkeypatch.setattr(cpu_linear, "packing_ratios", lambda layer: {**ratios, 1: 1.06})
    assert cpu_linear.prepack_linears(model, min_elements=0) == 2
    assert cpu_linear.weight_layout(model) == "both, packed from 4 rows"
    monkeypatch.setattr(cpu_linear, "packing_ratios", lambda layer: ratios)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 128))
    cpu_linear.prepack_linears(model, min_elements=0)
    layer = model[1]
    # Fewer rows take F.linear's product exactly; from four rows on, the packed one (same values, within rounding).
    for shape in [(3, 64), (1, 3, 64), (4, 64), (2, 5, 64)]:
        x = torch.randn(*shape)
        with torch.inference_mode():
            got, plain, packed = layer(x), F.linear(x, layer.weight, layer.bias), layer.packed_forward(x)
        assert torch.equal(got, packed if x.numel() // 64 >= 4 else plain), shape
        torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    # Where the second copy would not fit in the memory available, one layout is kept as before: plain.
    model = nn.Sequential(nn.Linear(64, 64))
    monkeypatch.setattr(cpu_linear, "_available_bytes", lambda: 64 * 64 * 4 * 3)
    assert cpu_linear.prepack_linears(model, min_elements=0) == 0 and type(model[0]) is nn.Linear


def test_packing_ratios_compare_both_arms_at_every_probe_row_count():
    if not cpu_linear.supported():
        pytest.skip("oneDNN packed linears are not available in this torch build")
    ratios = cpu_linear.packing_ratios(nn.Linear(64, 48), reps=3)
    assert set(ratios) == set(cpu_linear.PROBE_ROWS) and all(r > 0 for r in ratios.values())


@pytest.mark.parametrize("lean", [False, True])
def test_one_sequence_in_consecutive_blocks_reads_a_slice_with_the_same_logits(tiny_models, lean):
    """A lone sequence whose blocks were handed out in order reads its keys and values
    as a view of the cache instead of a gather: the same logits, bit for bit, as the same
    sequence scattered over the cache, for its prefill, decode and verify steps."""
    def run(table: list[int]) -> list[torch.Tensor]:
        runner = ModelRunner(LlamaForCausalLM.from_pretrained(tiny_models.target).eval(), num_blocks=12,
                             block_size=4, max_len=64, prepack=False, lean=lean)
        prompt = PROMPTS[2]
        steps = [[ForwardRow(table, 0, prompt[:-1], keep=3)], [ForwardRow(table, len(prompt) - 1, prompt[-1:])],
                 [ForwardRow(table, len(prompt), [33, 34, 35], keep=3)]]
        out = []
        for rows in steps:
            ctx = runner.prepare(rows)
            assert (ctx.read_slots is None) == (table == [4, 5, 6, 7])
            out += runner.forward(rows)
        return out

    consecutive, scattered = run([4, 5, 6, 7]), run([9, 2, 11, 5])
    assert len(consecutive) == 3
    for c, s in zip(consecutive, scattered):
        assert torch.equal(c, s)
