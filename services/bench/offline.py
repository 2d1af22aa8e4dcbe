"""Baselines measured in the same run: Hugging Face generate and assisted generation.

Each can run on stock weights or with the linear weights packed for oneDNN as
the engine packs them (``packed=True``), so a ratio can compare the serving
system with the same matrix kernels underneath, not the kernels themselves.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.engine.cpu_linear import prepack_linears


def _load(path: Path, packed: bool = False):
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    if packed:
        prepack_linears(model)
    return model, tok


@torch.inference_mode()
def hf_generate_tps(model_dir: Path, prompts: list[str], new_tokens: int, batch: int, repeats: int,
                    packed: bool = False) -> list[float]:
    """Tokens/s of greedy ``generate`` on one left-padded batch, ``repeats`` times."""
    model, tok = _load(model_dir, packed)
    enc = tok(prompts[:batch], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    model.generate(**{k: v[:2] for k, v in enc.items()}, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(**enc, **kw)
        out.append(batch * new_tokens / (time.perf_counter() - t0))
    return out


@torch.inference_mode()
def hf_assisted(target_dir: Path, draft_dir: Path, prompts: list[str], new_tokens: int,
                repeats: int, packed: bool = False) -> tuple[list[float], list[list[int]]]:
    """Tokens/s of greedy assisted generation (``assistant_model=``) one prompt at a
    time, and its tokens per prompt."""
    model, tok = _load(target_dir, packed)
    draft, _ = _load(draft_dir, packed)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
              assistant_model=draft)
    encoded = [tok(p, return_tensors="pt") for p in prompts]
    model.generate(**encoded[0], **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
    rates, outputs = [], []
    for _ in range(repeats):
        tokens, elapsed, outputs = 0, 0.0, []
        for enc in encoded:
            t0 = time.perf_counter()
            ids = model.generate(**enc, **kw)
            elapsed += time.perf_counter() - t0
            new = ids[0, enc["input_ids"].shape[1]:].tolist()
            outputs.append(new)
            tokens += len(new)
        rates.append(tokens / elapsed)
    return rates, outputs
