"""`llmesh bench`: load scenarios with their baselines, JSON, plots, BENCHMARKS.md."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from services.cli import argtypes


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="run a benchmark scenario (starts the services it needs)",
                              description=__doc__)
    p.add_argument("--scenario", help="the scenario to run: batching, speculative, router, autoscale, soak, openai, "
                                      "prefix, parallel")
    p.add_argument("--all", action="store_true", help="every scenario, as `make bench` runs them")
    p.add_argument("--model", default="target-large", help="target model name under HOME/models")
    p.add_argument("--draft", default="draft", help="draft model name under HOME/models")
    p.add_argument("--home", type=Path, default=None, help="llmesh home (default $LLMESH_HOME or ~/.cache/llmesh)")
    p.add_argument("--router", type=argtypes.address, metavar="HOST:PORT", default=None,
                   help="use a running suite at this address (HOST:PORT) instead of starting one")
    p.add_argument("--repeats", type=argtypes.positive_int32, default=3, help="runs per point; the median is reported")
    p.add_argument("--threads", type=argtypes.positive_int32, default=2, help="torch threads of the target process")
    p.add_argument("--concurrency", default="1,4,16,32", help="batching: concurrencies to measure")
    p.add_argument("--new-tokens", type=argtypes.positive_int32, default=None, help="tokens per request (scenario default)")
    p.add_argument("--duration-s", type=argtypes.seconds, default=None, help="soak: seconds of load (default 600)")
    p.add_argument("--streams", type=argtypes.positive_int32, default=None, help="soak: concurrent streams (default 32)")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks"), help="with --all: JSON and plots go here")
    p.add_argument("--markdown", type=Path, default=None, help="with --all: write this BENCHMARKS.md")
    p.add_argument("--no-harnesses", action="store_true",
                   help="openai: measure the front door's cost only (no GuideLLM sweep, no lm-evaluation-harness run)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from services.bench import report
    from services.bench.scenarios import BenchOptions
    from services.common.paths import default_home

    home = args.home or default_home()
    missing = [m for m in {args.model, args.draft, "target"} if not (home / "models" / m / "config.json").is_file()]
    if missing:
        print(f"llmesh bench: models {', '.join(sorted(missing))} are missing under {home}/models; "
              f"run `llmesh models build`", file=sys.stderr)
        return 2
    opts = BenchOptions(home=home, model=args.model, draft=args.draft, router=args.router or "", repeats=args.repeats,
                        threads=args.threads, progress=not args.no_progress, harnesses=not args.no_harnesses)
    concurrencies = tuple(int(c) for c in args.concurrency.split(","))
    if not args.all:
        if not args.scenario:
            print("llmesh bench: give --scenario NAME or --all", file=sys.stderr)
            return 2
        result = _one(args.scenario, opts, concurrencies, args.new_tokens, args.duration_s, args.streams)
        print(report.json.dumps(result, indent=2))
        if args.json:
            report.write_json(result, args.json)
        if args.plot:
            report.plot(result, args.plot)
        return 0 if not result.get("errors") else 1
    return _all(args, opts, concurrencies)


def _one(name, opts, concurrencies, new_tokens, duration_s=None, streams=None):
    from services.bench.scenarios import registry

    scenarios = registry()
    if name not in scenarios:
        raise SystemExit(f"llmesh bench: unknown scenario {name!r}; choose from {', '.join(scenarios)}")
    kw = {"new_tokens": new_tokens} if new_tokens else {}
    if name == "batching":
        kw["concurrencies"] = concurrencies
    if name == "soak":
        kw = {k: v for k, v in (("duration_s", duration_s), ("streams", streams)) if v}
    from services.bench.report import cpu_capability

    load_before = os.getloadavg()[0]
    result = scenarios[name](opts, **kw)
    # Other work on the machine moves every figure: say how busy it was. With the
    # kernel's autogroup scheduling on, `nice` does not shield a benchmark from
    # other terminal sessions' processes.
    return {**result, "cpu_capability": cpu_capability(),
            "host_load": {"load_average_1m_start": round(load_before, 2),
                          "load_average_1m_end": round(os.getloadavg()[0], 2),
                          "sched_autogroup_enabled": _autogroup()}}


def _autogroup() -> bool | None:
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return None


def _all(args, opts, concurrencies) -> int:
    """Every scenario: batching on target-large and target, speculative on target-large."""
    from dataclasses import replace

    from services.bench import report
    from services.bench.scenarios import ALL_RUNS, registry

    registry()
    out = args.out_dir
    runs = [(name, replace(opts, model=model)) for name, model in ALL_RUNS]
    sections, results, errors = [], [], 0
    for name, o in runs:
        stem = f"{name}-{o.model}"
        json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
        command = (f"llmesh bench --scenario {name} --model {o.model} --repeats {o.repeats} "
                   f"--json {json_path} --plot {png_path}")
        print(f"== {command}", flush=True)
        result = _one(name, o, concurrencies, args.new_tokens, args.duration_s, args.streams)
        report.write_json(result, json_path)
        report.plot(result, png_path)
        errors += result.get("errors") or 0
        results.append(result)
        sections.append(report.markdown_section(result, command, str(png_path)))
    if args.markdown:
        text = ["# llmesh benchmarks", "", f"Machine: {report.machine()}", "",
                "Regenerate with `make bench` (every scenario) or the command above each table. "
                "`target-large` is the trained `target` embedded in a larger shape with unchanged predictions; "
                "it stands in for a real large checkpoint.", "",
                "## Against the goals", "", report.goals_table(results), *sections,
                report.FINDINGS_MARKER, "", report.kept_findings(args.markdown), ""]
        args.markdown.write_text("\n".join(text))
        print(f"wrote {args.markdown}")
    return 0 if not errors else 1
