"""Benchmark reporting: the speculative break-even, plots, the goals table, kept findings."""

from __future__ import annotations

import asyncio

from services.bench import report, scenarios
from services.bench.loadgen import RequestResult, RunResult
from services.bench.scenarios import _arms_report, break_even


def point(ratio):
    return {"off_tps": 100.0, "on_tps": 100.0 * ratio, "ratio": ratio}


def test_break_even_is_the_last_batch_before_speculation_first_loses():
    assert break_even({"1": point(2.0), "2": point(1.4), "4": point(1.1), "8": point(0.8), "16": point(1.01)}) == 4
    assert break_even({"16": point(0.6), "1": point(0.9)}) == 0  # order of the keys does not matter
    assert break_even({"1": point(1.2), "2": point(1.0)}) == 2
    assert break_even({"1": {"static_always_ratio": 1.5}, "2": {"static_always_ratio": 0.9}}, "static_always_ratio") == 1


def test_arms_are_measured_in_counterbalanced_order(monkeypatch):
    """ABBA: a machine that slows down through the run slows every arm alike, not the arm run second."""
    order = []

    async def fake_closed_loop(stub, make, concurrency, total, label, progress):
        order.append(label)
        return RunResult([RequestResult(True, [1])], 1.0)

    monkeypatch.setattr(scenarios, "closed_loop", fake_closed_loop)
    arms = {"off": None, "on": None, "ngram": None}
    runs = asyncio.run(scenarios._measure("127.0.0.1:9", arms, 2, 4, 4, "c2", False))
    measured = [label.split(", ")[0].split()[-1] for label in order if "warm-up" not in label]
    assert measured == ["off", "on", "ngram", "ngram", "on", "off"] * 2
    assert {name: len(r) for name, r in runs.items()} == {"off": 4, "on": 4, "ngram": 4}


def test_every_arm_warms_up_at_the_concurrency_it_is_measured_at(monkeypatch):
    """A batch size's first meeting (new shapes, the cost model's first steps there) is not timed."""
    calls = []

    async def fake_closed_loop(stub, make, concurrency, total, label, progress):
        calls.append((label, concurrency, total))
        return RunResult([RequestResult(True, [1])], 1.0)

    monkeypatch.setattr(scenarios, "closed_loop", fake_closed_loop)
    asyncio.run(scenarios._measure("127.0.0.1:9", {"off": None, "on": None}, 16, 32, 2, "c16", False))
    warm = [(c, n) for label, c, n in calls if "warm-up" in label]
    assert warm == [(16, 16), (16, 16)]
    assert [(c, n) for label, c, n in calls if "warm-up" not in label] == [(16, 32)] * 4
    calls.clear()
    asyncio.run(scenarios._measure("127.0.0.1:9", {"off": None}, 1, 6, 1, "c1", False))
    assert [(c, n) for label, c, n in calls if "warm-up" in label] == [(1, 4)]


def test_prompt_set_arms_report_speedups_fallbacks_and_whether_outputs_agree():
    def run(wall_s, outputs, fallbacks=0, proposed=4, accepted=2):
        return RunResult([RequestResult(True, list(o), proposed=proposed, accepted=accepted, rounds=2,
                                        fallback_reason="acceptance 0.10 below 0.25" if i < fallbacks else "")
                          for i, o in enumerate(outputs)], wall_s)

    same = [[1, 2, 3], [4, 5, 6]]
    runs = {"off": [run(2.0, same), run(2.0, same)], "auto": [run(1.0, same, fallbacks=1), run(1.0, same, 2)]}
    out = _arms_report(runs)
    assert out["prompts"] == 2 and out["off_tps"] == 3.0 and out["auto_speedup"] == 2.0
    assert out["auto_acceptance"] == 0.5 and out["auto_fallbacks"] in (1, 2) and out["identical_greedy"]
    runs["auto"][1].results[0].tokens = [1, 2, 4]
    assert not _arms_report(runs)["identical_greedy"]


def test_the_speculative_plot_shows_arms_and_sweep(tmp_path):
    result = {"scenario": "speculative", "model": "m", "draft": "d", "target_only_tps": 30.0, "spec_tps": 60.0,
              "hf_assisted_tps": 29.0, "hf_assisted_packed_tps": 55.0, "c16_off_tps": 300.0, "c16_on_tps": 299.0,
              "acceptance_rate": 0.6, "break_even_batch": 1, "min_ratio_on_off": 1.0,
              "batch_sweep": {"1": {**point(2.0), "static_4_tps": 200.0, "static_4_off_tps": 100.0, "static_4_ratio": 2.0},
                              "8": {**point(1.0), "static_4_tps": 80.0, "static_4_ratio": 0.8}}}
    report.plot(result, tmp_path / "spec.png")
    assert (tmp_path / "spec.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_goals_table_says_which_goals_are_met():
    results = [{"scenario": "speculative", "model": "target-large", "speedup_vs_target_only": 1.95,
                "load_ratio_c16": 0.9, "identical_greedy": True},
               {"scenario": "router", "model": "target", "added_latency_p50_ms": 3.2}]
    rows = report.goals_table(results).splitlines()[2:]
    assert rows == [
        "| speculative `speedup_vs_target_only` >= 1.9 (target-large) | 1.95 | yes |",
        "| speculative `load_ratio_c16` >= 0.98 (target-large) | 0.9 | no |",
        "| speculative `identical_greedy` == true (target-large) | true | yes |",
        "| router `added_latency_p50_ms` <= 1.0 (target) | 3.2 | no |",
    ]


def test_hand_written_findings_survive_a_rewrite(tmp_path):
    page = tmp_path / "BENCHMARKS.md"
    assert report.kept_findings(page) == ""
    page.write_text(f"# tables\n\n| a | b |\n\n{report.FINDINGS_MARKER}\n\n## Findings\nverify costs 22 ms\n")
    assert report.kept_findings(page) == "## Findings\nverify costs 22 ms"
    page.write_text("# tables only\n")
    assert report.kept_findings(page) == ""


def test_mbu_counts_the_weights_a_decode_step_reads_and_the_kv_cache(tmp_path):
    import json

    from services.bench.machine import bytes_per_token, mbu

    cfg = {"hidden_size": 8, "num_hidden_layers": 2, "vocab_size": 10, "num_attention_heads": 2,
           "num_key_value_heads": 1, "intermediate_size": 16, "dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # Per layer: q and o 8x8 each, k and v 8x4 each, MLP 3 x 8x16, two norms of 8; then the final norm and the output layer.
    weights = 2 * (64 * 2 + 32 * 2 + 3 * 128 + 16) + 8 + 80
    assert bytes_per_token(tmp_path, 0) == weights * 4
    assert bytes_per_token(tmp_path, 10) == (weights + 2 * 2 * 1 * 4 * 10) * 4  # keys and values, 10 positions
    assert mbu(100.0, tmp_path, 0, weights * 4 * 200 / 1e9) == 0.5  # half the batch-1 bound
    assert mbu(0.0, tmp_path, 0, 1.0) is None


async def test_the_report_says_the_weight_layout_the_served_target_chose(tiny_models):
    """``packed_weights`` and ``weight_layout`` come from the targets behind the
    router (GetInfo), not from a constant: here a tiny model whose layers are
    too small to pack."""
    from tests.router_helpers import register, running_router, start_target, wait_routable

    target = await start_target(tiny_models)
    try:
        async with running_router() as (app, stub, _):
            await register(stub, "t1", target.address)
            await wait_routable(stub, ["t1"])
            layouts = await scenarios.target_layouts(app.address)
    finally:
        await target.stop(0)
    assert layouts == [target.loaded.engine.runner.weight_layout] == ["plain"]
    assert scenarios.weight_facts(layouts) == {"packed_weights": False, "weight_layout": "plain"}
    assert scenarios.weight_facts(["both, packed from 4 rows", "plain", ""]) == {
        "packed_weights": True, "weight_layout": "both, packed from 4 rows; plain"}
    assert scenarios.weight_facts([""]) == {"packed_weights": None, "weight_layout": ""}


async def test_a_router_that_does_not_answer_leaves_the_layout_unknown_not_the_run_failed():
    from tests.conftest import free_port

    assert await scenarios.target_layouts(f"127.0.0.1:{free_port()}") == []
    assert scenarios.weight_facts([]) == {"packed_weights": None, "weight_layout": ""}
