"""Benchmark output: JSON, PNG plots and the BENCHMARKS.md page."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores{mem}{gpu}; CPU capability: {cpu_capability()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def cpu_capability() -> str:
    """What this CPU gives torch: its kernel level (``torch.backends.cpu.get_cpu_capability()``,
    e.g. AVX2, AVX512) and whether it has bfloat16 (AVX512-BF16) and AMX tiles in
    hardware. Figures from machines that differ here are not comparable."""
    level = torch.backends.cpu.get_cpu_capability()
    extras = [name for name, probe in (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
              if getattr(torch.cpu, probe, lambda: False)()]
    return " + ".join([level, *extras]) if extras else f"{level} (no bf16 in hardware)"


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def plot(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if result["scenario"] == "batching":
        _plot_batching(result, path)
    elif result["scenario"] == "speculative":
        _plot_speculative(result, path)
    elif result["scenario"] == "autoscale":
        _plot_autoscale(result, path)
    elif result["scenario"] == "router":
        _plot_router(result, path)
    elif result["scenario"] == "soak":
        _plot_soak(result, path)
    elif result["scenario"] == "prefix":
        _plot_prefix(result, path)
    elif result["scenario"] == "parallel":
        _plot_parallel(result, path)


def _plot_parallel(r: dict, path: Path) -> None:
    """Tokens/s per arm at c1 and c32, and each rank's step time split (c32)."""
    arms = list(r["tps_c32"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(arms))
    ax1.bar([i - 0.2 for i in x], [r["tps_c1"][a] for a in arms], 0.4, label="concurrency 1")
    ax1.bar([i + 0.2 for i in x], [r["tps_c32"][a] for a in arms], 0.4, label="concurrency 32")
    ax1.set_xticks(list(x), arms)
    ax1.set(ylabel="tokens/s", title=f"Throughput, {r['model']}")
    ax1.legend()
    labels, parts = [], {"compute": [], "communication": [], "bubble": []}
    for a in arms:
        for rank in r["arms"][a]["ranks"]:
            labels.append(f"{a}\nr{rank['rank']}")
            for k in parts:
                parts[k].append(rank[f"{k}_fraction"])
    bottom = [0.0] * len(labels)
    for k, values in parts.items():
        ax2.bar(range(len(labels)), values, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax2.set_xticks(range(len(labels)), labels, fontsize=7)
    ax2.set(ylabel="share of step time (c32)", title="Where each rank's step time went")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_batching(r: dict, path: Path) -> None:
    cs = [int(c) for c in r["served_tps"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(cs, [r["served_tps"][str(c)] for c in cs], "o-", label="llmesh through the router")
    ax1.axhline(r["offline_hf_tps_b32"], color="gray", ls="--", label="HF generate, batch 32 (offline)")
    ax1.set(xlabel="concurrent streams", ylabel="tokens/s", title=f"Throughput, {r['model']}", xscale="log")
    ax1.set_xticks(cs, [str(c) for c in cs], minor=False)
    ax1.minorticks_off()
    ax1.legend()
    for key, style in (("ttft_p50_ms", "o-"), ("ttft_p99_ms", "o--"), ("tpot_p50_ms", "s-")):
        ax2.plot(cs, [r[key][str(c)] for c in cs], style, label=key.replace("_ms", "").replace("_", " "))
    ax2.set(xlabel="concurrent streams", ylabel="ms", title="Latency", xscale="log", yscale="log")
    ax2.set_xticks(cs, [str(c) for c in cs], minor=False)
    ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_speculative(r: dict, path: Path) -> None:
    arms = [("target only", r["target_only_tps"]), ("llmesh speculative", r["spec_tps"]),
            ("HF assisted (1 process)", r["hf_assisted_tps"]), ("c16 off", r["c16_off_tps"]),
            ("c16 on", r["c16_on_tps"])]
    if r.get("hf_assisted_packed_tps"):
        arms.insert(3, ("HF assisted, packed", r["hf_assisted_packed_tps"]))
    sweep = r.get("batch_sweep") or {}
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(13 if sweep else 8, 4.5), squeeze=False)
    ax = axes[0][0]
    colors = {"target only": "gray", "c16 off": "gray", "llmesh speculative": "C0", "c16 on": "C0"}
    bars = ax.bar([a for a, _ in arms], [v for _, v in arms], color=[colors.get(a, "C1") for a, _ in arms])
    ax.bar_label(bars, fmt="%.0f")
    ax.set(ylabel="tokens/s", title=f"Speculative decoding, {r['model']} + {r['draft']} "
                                    f"(acceptance {r['acceptance_rate']})")
    plt.setp(ax.get_xticklabels(), rotation=20, fontsize=8)
    if sweep:
        cs = sorted(int(c) for c in sweep)
        ax2 = axes[0][1]
        ax2.plot(cs, [sweep[str(c)]["off_tps"] for c in cs], "o-", color="gray", label="speculation off")
        ax2.plot(cs, [sweep[str(c)]["on_tps"] for c in cs], "o-", color="C0", label="speculation on (cost model)")
        for c in cs:
            ax2.annotate(f"{sweep[str(c)]['ratio']}x", (c, sweep[str(c)]["on_tps"]), textcoords="offset points",
                         xytext=(0, 6), ha="center", fontsize=8)
        statics = sorted({k[:-4] for p in sweep.values() for k in p
                          if k.startswith("static_") and k.endswith("_tps") and "makespan" not in k
                          and not k.endswith("_off_tps")})
        for i, arm in enumerate(statics):
            ax2.plot(cs, [sweep[str(c)].get(f"{arm}_tps") for c in cs], "x--", color=f"C{i + 1}",
                     label=f"speculation on ({arm.replace('_', ' ')})")
        ax2.set(xlabel="concurrent streams", ylabel="tokens/s", xscale="log",
                title=f"On/off sweep: min on/off {r.get('min_ratio_on_off')} (cost model); static break-even "
                      f"{r['break_even_batch']}")
        ax2.set_xticks(cs, [str(c) for c in cs])
        ax2.minorticks_off()
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_autoscale(r: dict, path: Path) -> None:
    """Load (streams) and instances over time, tokens/s on a second axis; scaler events marked."""
    ts = [p["t"] for p in r["timeline"]]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.step(ts, [p["load"] for p in r["timeline"]], where="post", color="gray", label="load (concurrent streams)")
    ax.step(ts, [p["instances"] for p in r["timeline"]], where="post", color="C0", lw=2, label="instances serving")
    ax.set(xlabel="seconds", ylabel="streams / instances",
           title=f"Autoscaling, {r['model']}: scale-up {r['scale_up_s']} s, scale-down {r['scale_down_s']} s, "
                 f"{r['failed_requests']} failed requests")
    ax2 = ax.twinx()
    ax2.plot(ts, [p["tokens_per_s"] for p in r["timeline"]], color="C1", alpha=0.8, label="tokens/s (clients)")
    ax2.plot(ts, [p.get("monitor_tokens_per_s", 0) for p in r["timeline"]], color="C1", ls="--", alpha=0.5,
             label="tokens/s (monitor)")
    ax2.set_ylabel("tokens/s")
    for e in r["history"]:
        if e["kind"] in ("serving", "stopped"):
            ax.axvline(e["t"], color="C2" if e["kind"] == "serving" else "C3", ls=":", lw=1)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0] + [plt.Line2D([], [], color="C2", ls=":"), plt.Line2D([], [], color="C3", ls=":")],
              lines[1] + lines2[1] + ["instance serving", "instance stopped"], loc="upper right", fontsize=8)
    ax.set_xlim(left=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_router(r: dict, path: Path) -> None:
    """Latency at concurrency 1 (direct, through the router, through a pass-through
    proxy where measured) and streaming throughput at concurrency 32."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    arms = [("direct\n(Generate)", "direct"), ("router\nGenerate", "router_generate"),
            ("router\nComplete", "router_complete")]
    if "proxy_generate_p50_ms" in r:
        arms.append(("pass-through\nproxy", "proxy_generate"))
    x = range(len(arms))
    for offset, q, color in ((-0.2, "p50", "C0"), (0.2, "p99", "C1")):
        bars = ax1.bar([i + offset for i in x], [r[f"{key}_{q}_ms"] for _, key in arms], width=0.4, color=color,
                       label=q)
        ax1.bar_label(bars, fmt="%.1f", fontsize=8)
    ax1.set_xticks(list(x), [a for a, _ in arms])
    ax1.set(ylabel="ms", title=f"{r['new_tokens']} tokens at concurrency 1: +{r['added_latency_p50_ms']} ms p50")
    ax1.legend()
    tput = [("direct", "direct_tps", "gray"), ("through the router", "router_tps", "C0")]
    if "proxy_tps" in r:
        tput.append(("through the proxy", "proxy_tps", "C2"))
    bars = ax2.bar([a for a, _, _ in tput], [r[k] for _, k, _ in tput], color=[c for _, _, c in tput])
    ax2.bar_label(bars, fmt="%.0f")
    f = r["failover"]
    ax2.set(ylabel="tokens/s", title=f"c{r['stream_concurrency']} streams: ratio {r['throughput_ratio']}; failover "
                                     f"{f['resumed']} resumed, {f['failed']} failed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_prefix(r: dict, path: Path) -> None:
    """TTFT p50/p90 and throughput per arm (one target cache off/on; two targets per routing policy)."""
    names = list(r["arms"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(names))
    for offset, q, color in ((-0.2, "p50", "C0"), (0.2, "p90", "C1")):
        bars = ax1.bar([i + offset for i in x], [r["arms"][n][f"ttft_{q}_ms"] for n in names], width=0.4,
                       color=color, label=f"TTFT {q}")
        ax1.bar_label(bars, fmt="%.0f", fontsize=7)
    ax1.set_xticks(list(x), [n.replace("_", "\n") for n in names], fontsize=8)
    ax1.set(ylabel="ms", yscale="log", title=f"{r['groups']} groups x {r['requests_per_group']} requests, "
                                             f"{r['prefix_tokens']}-token shared prefixes")
    ax1.legend(fontsize=8)
    bars = ax2.bar(list(x), [r["arms"][n]["throughput_tokens_per_s"] for n in names],
                   color=["gray", "C0", "C3", "C4", "C2"][:len(names)])
    ax2.bar_label(bars, labels=[f"{r['arms'][n]['throughput_tokens_per_s']:.1f}\nhit {r['arms'][n]['prefix_hit_rate']:.0%}"
                                for n in names], fontsize=7)
    ax2.set_xticks(list(x), [n.replace("_", "\n") for n in names], fontsize=8)
    ax2.set(ylabel="tokens/s", title=f"cache on/off TTFT p50 x{r['ttft_p50_ratio_cache_on_vs_off']}\nkv_aware vs "
                                     f"round_robin: TTFT p90 x{r['ttft_p90_ratio_kv_aware_vs_round_robin']}, "
                                     f"throughput x{r['throughput_ratio_kv_aware_vs_round_robin']}")
    ax2.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_soak(r: dict, path: Path) -> None:
    """Each service's resident memory through the run; warm-up end and load end marked."""
    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = sorted({k for p in r["rss_series"] for k in p if k != "t"})
    for name in names:
        points = [(p["t"], p[name]) for p in r["rss_series"] if name in p]
        ax.plot([t for t, _ in points], [v for _, v in points], label=f"{name} ({r['rss_growth'].get(name, 0):+.1%})")
    ax.axvline(r["warmup_s"], color="gray", ls=":", lw=1, label="start sample (after warm-up)")
    ax.axvline(r["duration_s"], color="gray", ls="--", lw=1, label="load stops")
    ax.set(xlabel="seconds", ylabel="RSS (MiB)", yscale="log",
           title=f"Soak, {r['streams']} streams, {r['requests']} requests: {r['errors']} errors, "
                 f"RSS growth max {r['rss_growth_max']:+.1%}, drained {r['drained']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: The goals the issues set: (scenario, model, field, comparison, target).
GOALS = [
    ("batching", "target-large", "ratio_c32_vs_offline", ">=", 0.8),
    ("batching", "target-large", "ratio_c32_vs_c1", ">=", 6),
    ("speculative", "target-large", "speedup_vs_target_only", ">=", 1.9),
    ("speculative", "target-large", "ratio_vs_hf_assisted", ">=", 1.0),
    ("speculative", "target-large", "load_ratio_c16", ">=", 0.98),
    ("speculative", "target-large", "identical_greedy", "==", True),
    ("speculative", "target-large", "min_ratio_on_off", ">=", 1.0),
    ("speculative", "target-large", "ratio_vs_hf_assisted_packed", ">=", 1.0),
    ("speculative", "target-large", "draft_ms_per_token", "<=", 1.0),
    ("speculative", "target-large", "mbu_c1", ">=", 0.6),
    ("router", "target", "added_latency_p50_ms", "<=", 1.0),
    ("router", "target", "throughput_ratio", ">=", 0.97),
    ("openai", "target", "http_added_latency_p50_ms", "<=", 1.0),
    ("openai", "target", "http_throughput_ratio", ">=", 0.95),
    ("openai", "target", "errors", "==", 0),
    ("autoscale", "target", "failed_requests", "==", 0),
    ("soak", "target", "errors", "==", 0),
    ("soak", "target", "rss_growth_max", "<", 0.05),
    ("soak", "target", "drained", "==", True),
    ("prefix", "target-large", "ttft_p50_ratio_cache_on_vs_off", "<=", 0.33),
    ("prefix", "target-large", "ttft_p90_ratio_kv_aware_vs_round_robin", "<=", 0.5),
    ("prefix", "target-large", "throughput_ratio_kv_aware_vs_round_robin", ">=", 1.3),
    ("prefix", "target-large", "identical_greedy", "==", True),
    ("prefix", "target-large", "errors", "==", 0),
    ("parallel", "target-large", "identical_greedy", "==", True),
    ("parallel", "target-large", "weight_memory_ratio_tp2", "<=", 0.6),
    ("parallel", "target-large", "weight_memory_ratio_pp2", "<=", 0.6),
    ("parallel", "target-large", "errors", "==", 0),
]
_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b,
        "==": lambda a, b: a == b}

#: Text after this line in BENCHMARKS.md is written by people and kept by `make bench`.
FINDINGS_MARKER = "<!-- findings: written by hand, kept when make bench rewrites the tables above -->"


def goals_table(results: list[dict]) -> str:
    """One row per goal whose scenario ran: the goal, the figure, met or not."""
    by_run = {(r["scenario"], r["model"]): r for r in results}
    lines = ["| goal | measured | met |", "|---|---|---|"]
    for scenario, model, key, op, target in GOALS:
        result = by_run.get((scenario, model))
        if result is None or key not in result:
            continue
        value = result[key]
        met = value is not None and _OPS[op](value, target)
        shown = str(value).lower() if isinstance(value, bool) else value
        goal = str(target).lower() if isinstance(target, bool) else target
        lines.append(f"| {scenario} `{key}` {op} {goal} ({model}) | {shown} | {'yes' if met else 'no'} |")
    return "\n".join(lines) + "\n"


def kept_findings(path: Path) -> str:
    """What follows the findings marker in an existing BENCHMARKS.md (empty if none)."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    _, marker, rest = text.partition(FINDINGS_MARKER)
    return rest.strip("\n") if marker else ""


def markdown_section(result: dict, command: str, plot_path: str | None) -> str:
    lines = [f"### `{result['scenario']}` on `{result['model']}`", "", f"Command: `{command}`", ""]
    lines += ["| figure | value |", "|---|---|"]
    for key, value in result.items():
        if key in ("scenario", "model"):
            continue
        if isinstance(value, list):
            value = f"{len(value)} entries (in the JSON)"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        lines.append(f"| `{key}` | {value} |")
    if plot_path:
        lines += ["", f"![{result['scenario']} {result['model']}]({plot_path})"]
    return "\n".join(lines) + "\n"
