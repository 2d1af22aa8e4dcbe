"""Embed a trained Llama model in a larger shape that computes exactly the same function.

``grow_llama`` stands a small trained model in for a real large checkpoint: the big
model costs what its shape costs (every matmul is full size and dense) yet predicts
exactly what the small one predicts, so speculative decoding between a draft and the
large model behaves as it would with the small target.

Construction (small hidden size ``d`` -> large ``D``, scale ``s = sqrt(D / d)``):

* The residual stream of the large model is ``[s * h, 0]`` where ``h`` is the small
  model's. RMSNorm divides by ``sqrt(mean(x^2) + eps)``; the mean runs over ``D``
  dims, of which ``d`` are nonzero, so scaling by ``s`` makes the mean (and so the
  normaliser, ``eps`` included) exactly the small model's.
* Norm weights become ``w / s`` on the first ``d`` dims, so a norm's output is
  ``[norm_small(h), 0]``. Matrices reading the stream get zero columns for the extra
  input dims; the extra outputs (extra attention heads, extra MLP units) are random
  but their columns in ``o_proj`` / ``down_proj`` are zero, so they add nothing.
* Matrices writing to the stream (``o_proj``, ``down_proj``) are ``s *`` the small
  ones on the first ``d`` rows and zero on the extra rows, keeping the stream at
  ``[s * h, 0]``. Extra layers have all-zero ``o_proj`` and ``down_proj``: identity
  residual blocks that still do all their (random, dense) attention and MLP work.
* The final norm weight is ``w / s`` with an untied head ``[W_head, 0]``. Embeddings
  are ``[s * E, 0]``; the large model never ties them to the head.
* ``head_dim`` and the GQA group size are kept (they fix attention scaling, RoPE and
  which kv head a query head reads), so the large model has more heads, not wider ones.

The logits agree to float rounding (about 1e-5 for float32; exact up to summation order
when ``s`` is a power of two).
"""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def _head_dim(cfg: LlamaConfig) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def grown_config(
    small: LlamaConfig,
    hidden_size: int,
    num_hidden_layers: int,
    intermediate_size: int,
) -> LlamaConfig:
    """The large model's config: ``small``'s, with the new sizes and heads to fill ``hidden_size``.

    Raises ``ValueError`` when the new shape cannot contain the small one.
    """
    hd = _head_dim(small)
    group = small.num_attention_heads // small.num_key_value_heads
    if hidden_size < small.hidden_size or hidden_size % hd:
        raise ValueError(f"hidden_size {hidden_size} must be >= {small.hidden_size} and a multiple of head_dim {hd}")
    heads = hidden_size // hd
    if heads % group:
        raise ValueError(f"{heads} heads do not divide into GQA groups of {group}")
    if num_hidden_layers < small.num_hidden_layers or intermediate_size < small.intermediate_size:
        raise ValueError("the large model must have at least the small one's layers and intermediate size")
    if getattr(small, "attention_bias", False) or getattr(small, "mlp_bias", False):
        raise ValueError("biases are not supported")
    cfg = LlamaConfig(**small.to_dict())
    cfg.hidden_size = hidden_size
    cfg.num_hidden_layers = num_hidden_layers
    cfg.intermediate_size = intermediate_size
    cfg.num_attention_heads = heads
    cfg.num_key_value_heads = heads // group
    cfg.head_dim = hd
    cfg.tie_word_embeddings = False
    # layer_types (when present) lists one entry per layer.
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[0]] * num_hidden_layers
    return cfg


def layer_placement(small_layers: int, large_layers: int) -> list[int]:
    """Index in the large model of each small layer, spread evenly, order kept."""
    return [(i * large_layers) // small_layers for i in range(small_layers)]


@torch.no_grad()
def grow_llama(
    small: LlamaForCausalLM,
    hidden_size: int,
    num_hidden_layers: int,
    intermediate_size: int,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` of the given shape whose logits equal ``small``'s.

    ``seed`` fixes the random values of the parts that do not affect the output. The
    result is float32, in eval mode, and saves/loads like any Llama checkpoint.
    """
    scfg = small.config
    cfg = grown_config(scfg, hidden_size, num_hidden_layers, intermediate_size)
    d, D = scfg.hidden_size, hidden_size
    s = math.sqrt(D / d)
    hd = _head_dim(scfg)
    q_rows, kv_rows = scfg.num_attention_heads * hd, scfg.num_key_value_heads * hd
    inter = scfg.intermediate_size

    # HF's own random init (normal(0, initializer_range), norms at 1) under a forked,
    # seeded RNG: the parts that do not affect the output look like an untrained
    # checkpoint, and the caller's global RNG state is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        big = LlamaForCausalLM(cfg).float()

    src, dst = small.model, big.model
    dst.embed_tokens.weight.zero_()
    dst.embed_tokens.weight[:, :d] = s * src.embed_tokens.weight

    placement = layer_placement(scfg.num_hidden_layers, num_hidden_layers)
    for j, layer in enumerate(dst.layers):
        attn, mlp = layer.self_attn, layer.mlp
        # Every layer starts as an identity residual block; small layers fill in below.
        attn.o_proj.weight.zero_()
        mlp.down_proj.weight.zero_()
        if j not in placement:
            continue
        sl = src.layers[placement.index(j)]
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            w = getattr(attn, name).weight
            w[:rows, d:] = 0.0
            w[:rows, :d] = getattr(sl.self_attn, name).weight
        attn.o_proj.weight[:d, :q_rows] = s * sl.self_attn.o_proj.weight
        for name in ("gate_proj", "up_proj"):
            w = getattr(mlp, name).weight
            w[:inter, d:] = 0.0
            w[:inter, :d] = getattr(sl.mlp, name).weight
        mlp.down_proj.weight[:d, :inter] = s * sl.mlp.down_proj.weight
        for name in ("input_layernorm", "post_attention_layernorm"):
            w = getattr(layer, name).weight
            w.zero_()
            w[:d] = getattr(sl, name).weight / s
            getattr(layer, name).variance_epsilon = getattr(sl, name).variance_epsilon

    dst.norm.weight.zero_()
    dst.norm.weight[:d] = src.norm.weight / s
    big.lm_head.weight.zero_()
    big.lm_head.weight[:, :d] = small.lm_head.weight
    big.generation_config = small.generation_config
    return big.eval()
