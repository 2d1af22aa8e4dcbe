"""Builds an engine from a model directory (shared by the target and draft services)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from services.engine.engine import Engine
from services.common.errors import InvalidArgument
from services.engine.model_runner import ModelRunner, bytes_per_token, configure_threads, load_model
from services.engine.settings import EngineSettings
from services.engine.speculation import Speculation

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """An engine and what GetInfo reports about its model."""

    engine: Engine
    model_name: str
    model_path: str
    eos_token_ids: list[int]
    tokenizer_hash: str
    dtype: str
    device: str
    #: Releases what the engine's runner holds outside this process (a parallel group's ranks); None: nothing.
    close: Callable[[], None] | None = None


def tokenizer_hash(tokenizer) -> str:
    """SHA-256 (hex) of the vocabulary, id-ordered: draft and target must match."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def resolve_device(device: str) -> str:
    """"auto" becomes "cuda" when available, else "cpu"; other names pass through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


#: KV-cache memory when none is given (bytes).
DEFAULT_KV_CACHE_MEMORY = 1 << 30


def check_model_dir(model_path: str) -> None:
    """FileNotFoundError, saying how to get one, when ``model_path`` holds no model."""
    if not Path(model_path, "config.json").is_file():
        raise FileNotFoundError(
            f"no model at {model_path}: build the default models with `llmesh models build` "
            f"or pass --model PATH to a Hugging Face causal LM directory")


def kv_cache_blocks(num_kv_blocks: int, kv_cache_memory: int, block_size: int, token_bytes: int) -> int:
    """Blocks of the paged KV cache: ``num_kv_blocks``, or (0) as many blocks of
    ``block_size`` tokens of ``token_bytes`` bytes each as ``kv_cache_memory``
    bytes hold. InvalidArgument when that is fewer than 2 (the null block and one)."""
    blocks = num_kv_blocks or kv_cache_memory // (block_size * token_bytes)
    if blocks < 2:
        raise InvalidArgument("kv_cache_memory", f"{kv_cache_memory} bytes hold {blocks} blocks of {block_size} "
                                                 f"tokens ({token_bytes} bytes each); at least 2 are needed")
    return blocks


def build_engine(model_path: str, settings: EngineSettings, *, device: str = "auto", dtype: str = "float32",
                 threads: int = 0, max_context: int = 0, prepack: bool = True, lean: bool = True,
                 metrics_window_s: float = 10.0,
                 model_name: str = "", speculation: Speculation | None = None, block_size: int = 16,
                 kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY, num_kv_blocks: int = 0,
                 prefix_caching: bool = True) -> LoadedModel:
    """Loads the model with transformers' own path and wraps it in an engine
    (not started), with ``speculation`` as its speculative-decoding strategy.
    The paged KV cache has ``num_kv_blocks`` blocks of ``block_size`` tokens
    (0: as many as ``kv_cache_memory`` bytes hold), with automatic prefix
    caching when ``prefix_caching``; ``lean``: the lean forward where it
    applies (:class:`ModelRunner`). Blocking (seconds); any thread. Raises
    FileNotFoundError when ``model_path`` holds no model, InvalidArgument for
    invalid settings or a cache that cannot hold one block beside the null block."""
    check_model_dir(model_path)
    configure_threads(threads)
    device = resolve_device(device)
    model, tokenizer = load_model(model_path, DTYPES[dtype], device)
    blocks = kv_cache_blocks(num_kv_blocks, kv_cache_memory, block_size, bytes_per_token(model))
    runner = ModelRunner(model, blocks, block_size, max_context or None, prepack=prepack, lean=lean)
    return engine_for(runner, model, tokenizer, model_path, settings, device=device, dtype=dtype,
                      metrics_window_s=metrics_window_s, model_name=model_name, speculation=speculation,
                      prefix_caching=prefix_caching)


def engine_for(runner, model, tokenizer, model_path: str, settings: EngineSettings, *, device: str, dtype: str,
               metrics_window_s: float = 10.0, model_name: str = "", speculation: Speculation | None = None,
               prefix_caching: bool = True, close: Callable[[], None] | None = None) -> LoadedModel:
    """An engine (not started) over ``runner`` (a ModelRunner, or one that
    stands for a group of ranks: its ``cache`` gives the block count and size
    the engine's block manager keeps), with the EOS ids and names of ``model``."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    engine = Engine(runner, tokenizer, settings, eos_token_ids=eos_ids, metrics_window_s=metrics_window_s,
                    speculation=speculation, prefix_caching=prefix_caching)
    log.info("loaded %s (%.1fM parameters) on %s, context %d, %d linear layers packed for oneDNN, %s forward, "
             "KV cache %d blocks of %d tokens, prefix caching %s", model_path, runner.num_parameters / 1e6, device,
             runner.max_len, runner.prepacked, "lean" if getattr(runner, "lean", None) else "transformers'",
             runner.cache.num_blocks, runner.cache.block_size, "on" if prefix_caching else "off")
    return LoadedModel(engine, model_name or Path(model_path).name, str(model_path), eos_ids,
                       tokenizer_hash(tokenizer), dtype, device, close)
