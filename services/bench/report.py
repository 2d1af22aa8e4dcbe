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
    return f"{cpu}, {os.cpu_count()} cores{mem}{gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def plot(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if result["scenario"] == "batching":
        _plot_batching(result, path)
    elif result["scenario"] == "speculative":
        _plot_speculative(result, path)


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
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar([a for a, _ in arms], [v for _, v in arms], color=["gray", "C0", "C1", "gray", "C0"])
    ax.bar_label(bars, fmt="%.0f")
    ax.set(ylabel="tokens/s", title=f"Speculative decoding, {r['model']} + {r['draft']} "
                                    f"(acceptance {r['acceptance_rate']})")
    plt.setp(ax.get_xticklabels(), rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_section(result: dict, command: str, plot_path: str | None) -> str:
    lines = [f"### `{result['scenario']}` on `{result['model']}`", "", f"Command: `{command}`", ""]
    lines += ["| figure | value |", "|---|---|"]
    for key, value in result.items():
        if key in ("scenario", "model"):
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        lines.append(f"| `{key}` | {value} |")
    if plot_path:
        lines += ["", f"![{result['scenario']} {result['model']}]({plot_path})"]
    return "\n".join(lines) + "\n"
