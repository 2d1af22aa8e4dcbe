"""Runs a Hugging Face causal LM over a step's rows against the paged KV cache.

The model is loaded by transformers' own ``from_pretrained`` path; only its
attention is routed, through transformers' ``AttentionInterface``, to a
function that writes each row's new keys and values into the blocks of its
block table and attends over the row's cached prefix, gathered by block
table (vLLM's PagedAttention, done with one ``index_select`` per layer and
tensor). Rows of different lengths and positions share one forward pass:
positions are per token (so rotary embeddings are right) and a 4-D boolean
mask says what each query sees. The slot mapping and the gather index are
computed once per forward from the rows alone: the runner keeps no block
bookkeeping (the engine's block manager does).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

from services.common.errors import InvalidArgument, OutOfRange
from services.engine.cpu_linear import MIN_ELEMENTS, prepack_linears
from services.engine.kv_cache import PagedKVCache

log = logging.getLogger(__name__)


class RunnerLost(RuntimeError):
    """The runner can run no more steps (a parallel rank died or hung): the
    engine stops, failing its requests with UNAVAILABLE."""


@dataclass
class ForwardRow:
    """Feed ``tokens`` at positions ``start..`` of the sequence whose positions
    live in ``block_table`` (block ids; position p in block ``p // block_size``);
    return logits at the last ``keep`` of them (1 for a decode or prefill,
    gamma+1 to verify). Plain data: picklable, all a runner needs."""

    block_table: list[int]
    start: int
    tokens: list[int]
    keep: int = 1


@dataclass
class _StepContext:
    cache: PagedKVCache
    ids: torch.Tensor        # [n, width] token ids, padded with 0
    positions: torch.Tensor  # [n, width] position of each token
    mask: torch.Tensor       # [n, 1, width, kv_len] bool: what each query sees
    keep_rows: torch.Tensor  # (row, t) of every logit kept, flattened
    keep_t: torch.Tensor
    keeps: list[int]
    write_row: torch.Tensor
    write_t: torch.Tensor
    #: Flat cache slot (block * block_size + offset) of each written token.
    write_slot: torch.Tensor
    #: ``[n * kv_len]`` flat slots each row reads, padded with the null block.
    read_slots: torch.Tensor
    kv_len: int


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Model and tokenizer from a directory, as any real checkpoint is loaded."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval(), tokenizer


class ModelRunner:
    """Owns the model, its KV cache and the step context the attention reads.

    Engine thread only (the step context is per call). ``max_len`` caps the
    positions per sequence (default: the model's ``max_position_embeddings``);
    the cache holds ``num_blocks`` blocks of ``block_size`` positions (block 0
    is the null block).
    """

    def __init__(self, model, num_blocks: int, block_size: int = 16, max_len: int | None = None,
                 prepack: bool = True, prepack_min_elements: int = MIN_ELEMENTS,
                 prepack_measure: bool = True, layers: range | None = None) -> None:
        """``layers``: the decoder layers this runner holds (global indices; a
        pipeline stage's, see services.parallel); default all. The KV cache
        holds those layers and ``config.num_key_value_heads`` heads (a tensor-
        parallel shard's own, once services.parallel.shard has set them)."""
        self.model = model
        cfg = model.config
        self.layers = layers if layers is not None else range(cfg.num_hidden_layers)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = cfg.vocab_size
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.cache = PagedKVCache(len(self.layers), num_blocks, block_size, kv_heads, head_dim,
                                  dtype=self.dtype, device=self.device)
        self._ctx: _StepContext | None = None
        # A name per runner: the registry is global, the step context is ours.
        self._attn_name = f"llmesh_paged_{id(self):x}"
        AttentionInterface.register(self._attn_name, self._attention)
        model.set_attn_implementation(self._attn_name)
        #: Parameters of the whole model (a shard's runner: set by services.parallel).
        self.num_parameters = sum(p.numel() for p in model.parameters())
        #: Linear layers whose weights were packed for oneDNN (0: stock F.linear).
        #: With ``prepack_measure``, only where packing is faster on this CPU (timed at start-up).
        self.prepacked = (prepack_linears(model, min_elements=prepack_min_elements, measure=prepack_measure)
                          if prepack else 0)
        self._decoder = model.get_decoder()
        self._lm_head = model.get_output_embeddings()

    # -- attention ------------------------------------------------------------
    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        ctx = self._ctx
        k_cache, v_cache = ctx.cache.layers[module.layer_idx - self.layers.start]
        k_new = key.transpose(1, 2)  # [B, T, kv_heads, D]
        v_new = value.transpose(1, 2)
        k_cache.index_copy_(0, ctx.write_slot, k_new[ctx.write_row, ctx.write_t])
        v_cache.index_copy_(0, ctx.write_slot, v_new[ctx.write_row, ctx.write_t])
        shape = (query.shape[0], ctx.kv_len) + k_cache.shape[1:]
        keys = k_cache.index_select(0, ctx.read_slots).view(shape)
        values = v_cache.index_select(0, ctx.read_slots).view(shape)
        out = F.scaled_dot_product_attention(
            query, keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != keys.shape[2],
        )
        return out.transpose(1, 2).contiguous(), None

    # -- forward ----------------------------------------------------------------
    def check(self, row: ForwardRow) -> None:
        """Raises OutOfRange / InvalidArgument (naming what) when ``row`` cannot
        run: no tokens, positions past ``max_len``, a block table that does not
        cover the positions or names a block outside ``[1, num_blocks)``, a
        token id outside the vocabulary, ``keep`` outside ``[1, len(tokens)]``. :meth:`forward` assumes every row passed, so that
        one row's fault never fails the rows batched with it. Any thread."""
        if not row.tokens:
            raise InvalidArgument("tokens", "a row must feed at least one token")
        end = row.start + len(row.tokens)
        if row.start < 0 or end > self.max_len:
            raise OutOfRange("context", f"positions {row.start}..{end - 1} do not fit "
                                        f"the context of {self.max_len} tokens")
        if len(row.block_table) * self.cache.block_size < end:
            raise OutOfRange("block_table", f"{len(row.block_table)} blocks of {self.cache.block_size} do not "
                                            f"hold positions up to {end - 1}")
        if row.block_table and not (1 <= min(row.block_table) and max(row.block_table) < self.cache.num_blocks):
            raise OutOfRange("block_table", f"block ids must be in [1, {self.cache.num_blocks}), "
                                            f"got {min(row.block_table)}..{max(row.block_table)}")
        low, high = min(row.tokens), max(row.tokens)
        if low < 0 or high >= self.vocab_size:
            raise OutOfRange("tokens", f"token id {low if low < 0 else high} is outside the vocabulary "
                                       f"[0, {self.vocab_size})")
        if not 1 <= row.keep <= len(row.tokens):
            raise InvalidArgument("keep", f"must be in [1, {len(row.tokens)}], got {row.keep}")

    @torch.inference_mode()
    def forward(self, rows: list[ForwardRow]) -> list[torch.Tensor]:
        """Logits (float32, ``[keep, vocab]``) for each row, in order; writes
        each row's keys and values into its blocks at positions ``start..``.
        Every row must pass :meth:`check`. Engine thread; what the model raises
        propagates (the engine fails that batch's sequences)."""
        if not rows:
            return []
        ctx = self.prepare(rows)
        return self.head(self.run_layers(self.embed(ctx), ctx), ctx)

    # -- the forward's phases (a pipeline stage runs some of them: services.parallel) --
    def prepare(self, rows: list[ForwardRow]) -> _StepContext:
        """The step context of ``rows`` (non-empty, each passed :meth:`check`):
        ids, positions, mask and where keys/values go; zeroes the cache
        positions the rows will read. Any rank computes the same from the same rows."""
        dev = self.device
        n = len(rows)
        width = max(len(r.tokens) for r in rows)
        ids = torch.zeros(n, width, dtype=torch.long)
        starts = torch.tensor([r.start for r in rows])
        lens = torch.tensor([len(r.tokens) for r in rows])
        for i, r in enumerate(rows):
            ids[i, : len(r.tokens)] = torch.tensor(r.tokens)
        t = torch.arange(width)
        positions = (starts[:, None] + t[None, :]).clamp(max=self.max_len - 1)
        valid = t[None, :] < lens[:, None]  # [n, width]
        write_row, write_t = valid.nonzero(as_tuple=True)
        kv_len = int((starts + lens).max())
        bs = self.cache.block_size
        num_blocks = -(-kv_len // bs)
        tables = torch.zeros(n, num_blocks, dtype=torch.long)  # padded with the null block
        for i, r in enumerate(rows):
            tables[i, : min(len(r.block_table), num_blocks)] = torch.tensor(r.block_table[:num_blocks])
        j = torch.arange(kv_len)
        read_slots = tables[:, j // bs] * bs + j % bs  # [n, kv_len]
        mask = j[None, None, :] <= positions[:, :, None]  # causal within each row's own positions
        # Padded queries see only position 0, so softmax stays finite; their output is dropped.
        mask = torch.where(valid[:, :, None], mask, j[None, None, :] == 0)[:, None]
        self.cache.ensure_clean(int(tables.max()) + 1)
        keep_idx = [(i, p) for i, r in enumerate(rows) for p in range(len(r.tokens) - r.keep, len(r.tokens))]
        return _StepContext(
            cache=self.cache, ids=ids.to(dev), positions=positions.to(dev), mask=mask.to(dev),
            keep_rows=torch.tensor([i for i, _ in keep_idx], device=dev),
            keep_t=torch.tensor([p for _, p in keep_idx], device=dev), keeps=[r.keep for r in rows],
            write_row=write_row.to(dev), write_t=write_t.to(dev),
            write_slot=read_slots[write_row, positions[write_row, write_t]].to(dev),
            read_slots=read_slots.view(-1).to(dev), kv_len=kv_len,
        )

    @torch.inference_mode()
    def embed(self, ctx: _StepContext) -> torch.Tensor:
        """Input embeddings ``[n, width, hidden]`` (first stage only)."""
        return self._decoder.embed_tokens(ctx.ids)

    @torch.inference_mode()
    def run_layers(self, hidden: torch.Tensor, ctx: _StepContext) -> torch.Tensor:
        """Runs this runner's decoder layers over ``hidden`` ``[n, width, hidden]``."""
        position_embeddings = self._decoder.rotary_emb(hidden, position_ids=ctx.positions)
        self._ctx = ctx
        try:
            for layer in self._decoder.layers[: len(self.layers)]:
                hidden = layer(hidden, attention_mask=ctx.mask, position_ids=ctx.positions,
                               position_embeddings=position_embeddings)
        finally:
            self._ctx = None
        return hidden

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor, ctx: _StepContext) -> list[torch.Tensor]:
        """Final norm and LM head at the kept positions: float32 ``[keep, vocab]`` per row (last stage only)."""
        hidden = self._decoder.norm(hidden[ctx.keep_rows, ctx.keep_t])
        return list(self._lm_head(hidden).float().split(ctx.keeps))

    def timed_forward(self, rows: list[ForwardRow]) -> tuple[list[torch.Tensor], float]:
        """:meth:`forward` and its wall time in seconds (the device synchronised)."""
        return timed(self.forward, rows, self.device)

    def warmup(self) -> None:
        """Runs a small prefill and decode so first requests don't pay for lazy init."""
        table = [1]  # the first block the block manager hands out; what it holds is overwritten before use
        self.forward([ForwardRow(table, start=0, tokens=[0] * 4)])
        self.forward([ForwardRow(table, start=4, tokens=[0])])


def timed(forward, rows: list[ForwardRow], device: torch.device) -> tuple[list[torch.Tensor], float]:
    """``forward(rows)`` and its wall time in seconds (``time.perf_counter``),
    ``device`` synchronised first when it is a GPU; what every runner's
    ``timed_forward`` measures for the speculation cost model."""
    t0 = time.perf_counter()
    out = forward(rows)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def configure_threads(num_threads: int) -> None:
    """One intra-op pool per process, sized from config, so processes sharing a
    machine don't oversubscribe it."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def bytes_per_token(model) -> int:
    """KV-cache bytes one token takes over all layers (keys and values)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    elem = torch.finfo(next(model.parameters()).dtype).bits // 8
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * elem


__all__ = ["ForwardRow", "ModelRunner", "RunnerLost", "bytes_per_token", "configure_threads", "load_model", "timed"]
