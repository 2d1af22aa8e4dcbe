"""The autoscale bench scenario is registered and plots (the scenario itself runs under `make bench`)."""

from __future__ import annotations

from services.bench import report
from services.bench.scenarios import ALL_RUNS, registry


def test_the_autoscale_scenario_registers_itself():
    assert "autoscale" in registry()
    assert ("autoscale", "target") in ALL_RUNS and ALL_RUNS.count(("autoscale", "target")) == 1


def test_the_autoscale_plot(tmp_path):
    timeline = [{"t": t / 2, "load": 16 if 10 <= t < 40 else 1, "instances": 1 + (15 <= t < 45),
                 "tokens_per_s": 100.0 + t, "monitor_tokens_per_s": 90.0} for t in range(60)]
    result = {"scenario": "autoscale", "model": "target", "scale_up_s": 2.5, "scale_down_s": 2.5,
              "failed_requests": 0, "timeline": timeline,
              "history": [{"t": 7.5, "kind": "serving"}, {"t": 22.5, "kind": "stopped"}, {"t": 1, "kind": "decision"}]}
    report.plot(result, tmp_path / "autoscale.png")
    assert (tmp_path / "autoscale.png").stat().st_size > 10_000
