"""Shared fixtures: tiny random-weight models built from a config, on CPU.

Tests never need the built default models: a byte-level tokenizer is trained
on a few KB of Python's own help text and two Llama models with random
weights (a "target" and a smaller "draft") are saved with save_pretrained,
so services load them through the same from_pretrained path as real ones.
"""

from __future__ import annotations

import asyncio
import copy
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from services.models.tokenizer import train_tokenizer

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)


@dataclass
class TinyModels:
    target: Path
    draft: Path
    tokenizer: object
    vocab_size: int
    max_context: int


def _corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:40]]


def _save(path: Path, config: LlamaConfig, tokenizer, seed: int) -> None:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def tiny_llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, max_pos: int = 256) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=max_pos, eos_token_id=0, bos_token_id=0, pad_token_id=0)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    root = tmp_path_factory.mktemp("models")
    tokenizer = train_tokenizer(_corpus(), vocab_size=384)
    vocab = len(tokenizer)
    _save(root / "target", tiny_llama_config(vocab, 64, 2), tokenizer, seed=0)
    _save(root / "draft", tiny_llama_config(vocab, 32, 1), tokenizer, seed=1)
    return TinyModels(root / "target", root / "draft", tokenizer, vocab, 256)


@pytest.fixture(scope="session")
def reference_model(tiny_models):
    """The tiny target loaded with stock transformers, for reference outputs."""
    model = LlamaForCausalLM.from_pretrained(tiny_models.target).eval()
    return model


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy continuation by Hugging Face generate, EOS ignored."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def eventually(condition, timeout_s: float = 10.0, what: str = "condition", every_s: float = 0.02):
    """Polls an async or plain condition (bounded) until it returns a truthy
    value, and returns that value; fails naming ``what``."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(every_s)  # sleep-ok: bounded poll of a condition
