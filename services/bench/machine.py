"""The machine a benchmark ran on, and figures against its limit (model-bandwidth utilisation).

At batch 1, decoding a token reads every weight once and the KV cache of the
context so far, so a CPU's memory bandwidth bounds tokens/s at
``bandwidth / bytes_per_token``. ``mbu`` (model-bandwidth utilisation, as in
Databricks' "LLM inference performance engineering" and the MBU of
"Efficient LLM inference" write-ups) is measured tokens/s divided by that
bound. Speculation reads the weights once per *round*, so its mbu can pass 1:
it beats the batch-1 bound, which is its point.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def memory_bandwidth_gbs(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Read bandwidth (GB/s) of summing a ``mib`` MiB float32 buffer with
    ``threads`` torch threads, the best of ``repeats`` (the buffer is much
    larger than any cache). Sets and restores torch's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        buf = torch.ones(mib * (1 << 20) // 4, dtype=torch.float32)
        buf.sum()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - t0)
        return buf.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(before)


def machine_info(threads: int) -> dict:
    """What decides the figures besides the code: CPU capability (the kernels
    ATen picked: ``ATEN_CPU_CAPABILITY`` may lower it), cores, the services'
    torch threads, and the memory bandwidth measured now."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY", ""),
        "cores": os.cpu_count(),
        "service_threads": threads,
        "memory_bandwidth_gbs": round(memory_bandwidth_gbs(threads), 2),
    }


def bytes_per_token(model_dir: Path, context_tokens: float) -> float:
    """Bytes a batch-1 decode step of the model in ``model_dir`` reads: every
    weight but the input embedding table (one row of it is read; all of it
    when tied to the output layer), plus keys and values for
    ``context_tokens`` positions. float32 unless the config says otherwise."""
    cfg = json.loads(Path(model_dir, "config.json").read_text())
    hidden, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    inter = cfg["intermediate_size"]
    size = {"bfloat16": 2, "float16": 2}.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or ""), 4)
    per_layer = hidden * (heads * head_dim) * 2 + hidden * (kv_heads * head_dim) * 2 + 3 * hidden * inter + 2 * hidden
    weights = layers * per_layer + hidden + vocab * hidden  # the output layer (or tied embedding) is read whole
    kv = 2 * layers * kv_heads * head_dim * context_tokens
    return (weights + kv) * size


def mbu(tokens_per_s: float, model_dir: Path, context_tokens: float, bandwidth_gbs: float) -> float | None:
    """Measured ``tokens_per_s`` over the batch-1 bound ``bandwidth / bytes_per_token``."""
    if not bandwidth_gbs or not tokens_per_s:
        return None
    return round(tokens_per_s * bytes_per_token(model_dir, context_tokens) / (bandwidth_gbs * 1e9), 3)
