"""Cuts a loaded Llama-family model down to one rank's shard, in place.

Tensor parallelism (Megatron-LM, Shoeybi et al., 2019): q/k/v and gate/up
projections column-parallel (each rank keeps its attention heads, its KV
heads and its slice of the MLP), o and down projections row-parallel with one
all-reduce per block half; embedding and LM head vocabulary-parallel (a
masked lookup plus all-reduce; local logits plus all-gather). The config
then says the rank's own head counts, so attention and the KV cache see
``num_heads / tp`` and ``num_key_value_heads / tp``.

Pipeline parallelism: the rank keeps its stage's decoder layers (balanced by
parameter count, :func:`services.parallel.layout.balance_stages`); the
embedding lives on the first stage, the final norm and LM head on the last.

Why not transformers' ``tp_plan``: the split is the same one (Llama's
``base_model_tp_plan``: q/k/v/gate/up colwise, o/down rowwise; lm_head
``colwise_gather_output``), but ``from_pretrained(tp_plan="auto")`` makes
the parameters DTensors, needs ``accelerate`` and the process group before
loading, keeps the embedding whole and knows no pipeline stages, while the
engine's oneDNN weight packing (services.engine.cpu_linear) and KV cache
want plain tensors of known local shapes. It was not tried on this tree;
the slicing below is a few lines per projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.parallel import comm
from services.parallel.layout import Layout, balance_stages


def _split(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[lo, hi)`` of part ``index`` of ``n`` split into ``parts`` near-equal parts."""
    q, r = divmod(n, parts)
    lo = index * q + min(index, r)
    return lo, lo + q + (1 if index < r else 0)


def _keep_rows(linear: nn.Linear, lo: int, hi: int) -> None:
    linear.weight = nn.Parameter(linear.weight.data[lo:hi].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[lo:hi].clone(), requires_grad=False)
    linear.out_features = hi - lo


def _keep_cols(linear: nn.Linear, lo: int, hi: int, keep_bias: bool) -> None:
    linear.weight = nn.Parameter(linear.weight.data[:, lo:hi].clone(), requires_grad=False)
    if linear.bias is not None and not keep_bias:
        linear.bias = None  # added once, by tp_rank 0, before the sum
    linear.in_features = hi - lo


class RowParallel(nn.Module):
    """A row-parallel linear: this rank's partial product, summed over the group."""

    def __init__(self, linear: nn.Module, group) -> None:
        super().__init__()
        self.linear = linear
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce(self.linear(x), self.group)


class VocabParallelEmbedding(nn.Module):
    """Rows ``[lo, hi)`` of the embedding; ids outside give 0; summed over the group."""

    def __init__(self, embedding: nn.Embedding, lo: int, hi: int, group) -> None:
        super().__init__()
        self.weight = nn.Parameter(embedding.weight.data[lo:hi].clone(), requires_grad=False)
        self.lo, self.hi, self.group = lo, hi, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.lo
        inside = (local >= 0) & (local < self.hi - self.lo)
        out = F.embedding(local.clamp(0, self.hi - self.lo - 1), self.weight) * inside[..., None]
        return comm.all_reduce(out, self.group)


class VocabParallelHead(nn.Module):
    """Logits of vocabulary rows ``[lo, hi)``, gathered over the group into the whole vocabulary."""

    def __init__(self, linear: nn.Module, sizes: list[int], group) -> None:
        super().__init__()
        self.linear = linear
        self.sizes, self.group = sizes, group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return comm.all_gather_last(self.linear(hidden), self.sizes, self.group)


def check_divisible(config, tp: int) -> None:
    """ValueError unless ``tp`` divides the attention and KV heads."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % tp or kv % tp:
        raise ValueError(f"--tensor-parallel-size {tp} must divide the model's {heads} attention heads and "
                         f"{kv} key/value heads")


def stage_layers(model, pp: int) -> list[range]:
    """Every stage's decoder layers, balanced by parameter count."""
    decoder = model.get_decoder()
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in decoder.layers]
    first = sum(p.numel() for p in decoder.embed_tokens.parameters())
    last = sum(p.numel() for p in decoder.norm.parameters()) + sum(
        p.numel() for p in model.get_output_embeddings().parameters())
    return balance_stages(per_layer, pp, first, last)


def shard_model(model, layout: Layout, tp_group) -> range:
    """Cuts ``model`` (unsharded, loaded on every rank) down to ``layout``'s
    shard in place; returns the rank's layer range (global indices). Raises
    ValueError when the sizes do not divide the model."""
    cfg = model.config
    decoder = model.get_decoder()
    layers = stage_layers(model, layout.pp)[layout.stage]
    decoder.layers = nn.ModuleList(decoder.layers[i] for i in layers)
    if not layout.first_stage:
        decoder.embed_tokens = None
    if not layout.last_stage:
        decoder.norm = None
        model.set_output_embeddings(None)
    if layout.tp > 1:
        _shard_tensor_parallel(model, layout.tp, layout.tp_rank, tp_group)
    return layers


def _shard_tensor_parallel(model, tp: int, rank: int, group) -> None:
    cfg = model.config
    check_divisible(cfg, tp)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    decoder = model.get_decoder()
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        h_lo, h_hi = _split(heads, tp, rank)
        k_lo, k_hi = _split(kv, tp, rank)
        _keep_rows(attn.q_proj, h_lo * head_dim, h_hi * head_dim)
        _keep_rows(attn.k_proj, k_lo * head_dim, k_hi * head_dim)
        _keep_rows(attn.v_proj, k_lo * head_dim, k_hi * head_dim)
        _keep_cols(attn.o_proj, h_lo * head_dim, h_hi * head_dim, keep_bias=rank == 0)
        attn.o_proj = RowParallel(attn.o_proj, group)
        for name in ("num_heads", "num_attention_heads"):
            if hasattr(attn, name):
                setattr(attn, name, h_hi - h_lo)
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = k_hi - k_lo
        i_lo, i_hi = _split(mlp.gate_proj.out_features, tp, rank)
        _keep_rows(mlp.gate_proj, i_lo, i_hi)
        _keep_rows(mlp.up_proj, i_lo, i_hi)
        _keep_cols(mlp.down_proj, i_lo, i_hi, keep_bias=rank == 0)
        mlp.down_proj = RowParallel(mlp.down_proj, group)
    vocab = cfg.vocab_size
    sizes = [hi - lo for lo, hi in (_split(vocab, tp, r) for r in range(tp))]
    v_lo, v_hi = _split(vocab, tp, rank)
    head = model.get_output_embeddings()
    tied = head is not None and decoder.embed_tokens is not None and head.weight is decoder.embed_tokens.weight
    if decoder.embed_tokens is not None:
        decoder.embed_tokens = VocabParallelEmbedding(decoder.embed_tokens, v_lo, v_hi, group)
    if head is not None:
        model.config.tie_word_embeddings = False
        _keep_rows(head, v_lo, v_hi)
        if tied:  # the same vocabulary rows: one tensor, as before the cut
            head.weight = decoder.embed_tokens.weight
        model.set_output_embeddings(VocabParallelHead(head, sizes, group))
    # What this rank's attention and KV cache see.
    cfg.head_dim = head_dim
    cfg.num_attention_heads = heads // tp
    cfg.num_key_value_heads = kv // tp
