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
from services.engine.cpu_linear import MIN_ELEMENTS, prepack_linears, weight_layout
from services.engine.kv_cache import PagedKVCache
from services.engine.lean_llama import LeanLlama, unsupported

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
    #: Index of every kept logit's token in the ``[n * width]`` flattened step
    #: (None: every token, in order: each row feeds ``width`` tokens and keeps them all).
    keep_index: torch.Tensor | None
    keeps: list[int]
    #: (row, t) of every token fed, flattened (None: all ``n * width``, in order: no padding).
    write_rows: tuple[torch.Tensor, torch.Tensor] | None
    #: Flat cache slot (block * block_size + offset) of each written token.
    write_slot: torch.Tensor
    #: ``[n * kv_len]`` flat slots each row reads, padded with the null block
    #: (None: one row whose blocks are consecutive, read as a slice from ``read_start``).
    read_slots: torch.Tensor | None
    kv_len: int
    #: First flat slot of the slice when ``read_slots`` is None.
    read_start: int = 0
    #: The largest of ``positions`` (padding included), known without reading the tensor.
    max_position: int = 0


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
                 prepack_measure: bool = True, layers: range | None = None, lean: bool = True,
                 prepack_dual_from: int | None = None) -> None:
        """``layers``: the decoder layers this runner holds (global indices; a
        pipeline stage's, see services.parallel); default all. The KV cache
        holds those layers and ``config.num_key_value_heads`` heads (a tensor-
        parallel shard's own, once services.parallel.shard has set them).
        ``prepack_dual_from`` (without ``prepack_measure``, for tests): keep
        both layouts, packed from that many rows (:class:`~services.engine.cpu_linear.DualLinear`).
        ``lean``: run a Llama-family model's layers through
        :mod:`services.engine.lean_llama` (the same logits, less Python per
        step) where it supports the model and reproduces transformers' logits
        on a probe; transformers' module tree otherwise, said once in the log."""
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
        #: With ``prepack_measure``, only where packing is faster on this CPU (timed at start-up), and
        #: both layouts where it is faster only from some row count on.
        self.prepacked = (prepack_linears(model, min_elements=prepack_min_elements, measure=prepack_measure,
                                          dual_from=prepack_dual_from) if prepack else 0)
        #: :func:`services.engine.cpu_linear.weight_layout` of the model after packing ("plain", "packed",
        #: "both, packed from N rows"), as GetInfo reports it.
        self.weight_layout = weight_layout(model)
        self._decoder = model.get_decoder()
        self._lm_head = model.get_output_embeddings()
        #: The lean forward of the model's layers, or None: transformers' modules.
        self.lean: LeanLlama | None = None
        self.lean = self._lean_forward() if lean else None

    def _lean_forward(self) -> LeanLlama | None:
        """A LeanLlama for this model when it supports it and its logits equal
        transformers' path on a probe (a prefill and a decode), else None; says
        which in the log. The one with fused q/k/v and gate/up products is tried
        first, then the one without."""
        reason = unsupported(self.model, self.layers)
        if reason is None:
            probe = self._probe_rows()
            with torch.inference_mode():
                want = [ModelRunner.forward(self, rows) for rows in probe]
            for fuse in (True, False):
                lean = LeanLlama(self.model, fuse=fuse)
                if fuse and not lean.fused:
                    continue
                with torch.inference_mode():
                    self.lean = lean
                    try:
                        got = [ModelRunner.forward(self, rows) for rows in probe]
                    finally:
                        self.lean = None
                if all(torch.equal(g, w) for gs, ws in zip(got, want) for g, w in zip(gs, ws)):
                    log.info("lean forward: %s runs without transformers' module tree (same logits on a probe; "
                             "%d of %d q/k/v and gate/up groups fused)", type(self.model).__name__,
                             lean.fused, 2 * len(self.layers))
                    return lean
            reason = "its logits differ from transformers' on a probe"
        log.info("transformers' forward for this model: the lean one does not apply (%s)", reason)
        return None

    def _probe_rows(self) -> list[list[ForwardRow]]:
        """A prefill of two rows (one keeping several logits) then a decode row, in blocks 1 and 2."""
        n = max(1, min(4, self.cache.block_size, self.max_len - 1))
        tokens = [t % self.vocab_size for t in (3, 1, 4, 1)][:n]
        second = [ForwardRow([2], 0, tokens[: max(1, n - 1)])] if self.cache.num_blocks > 2 else []
        return [[ForwardRow([1], 0, tokens, keep=n)] + second, [ForwardRow([1], n - 1, tokens[-1:])]]

    # -- attention ------------------------------------------------------------
    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """transformers' AttentionInterface signature over :meth:`_paged_attention`
        (``attention_mask`` is the step context's mask, which that reads itself)."""
        return self._paged_attention(module.layer_idx, query, key, value, scaling), None

    def _paged_attention(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         scaling: float | None) -> torch.Tensor:
        """Writes the step's new keys and values (``[n, kv_heads, width, head_dim]``)
        into their cache slots, then attends ``query`` (``[n, heads, width,
        head_dim]``) over each row's cached positions, gathered by block table,
        under the step context's mask. Returns ``[n, width, heads, head_dim]``,
        contiguous. Both forwards (transformers' and the lean one) call this."""
        ctx = self._ctx
        k_cache, v_cache = ctx.cache.layers[layer_idx - self.layers.start]
        k_new = key.transpose(1, 2)  # [B, T, kv_heads, D]
        v_new = value.transpose(1, 2)
        if ctx.write_rows is None:  # every token of the step, in order
            k_new, v_new = k_new.reshape(-1, *k_new.shape[2:]), v_new.reshape(-1, *v_new.shape[2:])
        else:
            k_new, v_new = k_new[ctx.write_rows], v_new[ctx.write_rows]
        k_cache.index_copy_(0, ctx.write_slot, k_new)
        v_cache.index_copy_(0, ctx.write_slot, v_new)
        shape = (query.shape[0], ctx.kv_len) + k_cache.shape[1:]
        if ctx.read_slots is None:  # one row in consecutive blocks: a view of the cache, no gather
            keys = k_cache.narrow(0, ctx.read_start, ctx.kv_len).view(shape)
            values = v_cache.narrow(0, ctx.read_start, ctx.kv_len).view(shape)
        else:
            keys = k_cache.index_select(0, ctx.read_slots).view(shape)
            values = v_cache.index_select(0, ctx.read_slots).view(shape)
        out = F.scaled_dot_product_attention(
            query, keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=ctx.mask, scale=scaling, enable_gqa=query.shape[1] != keys.shape[2],
        )
        return out.transpose(1, 2).contiguous()

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
        dev, bs = self.device, self.cache.block_size
        n = len(rows)
        lens = [len(r.tokens) for r in rows]
        width = max(lens)
        kv_len = max(r.start + k for r, k in zip(rows, lens))
        num_blocks = -(-kv_len // bs)
        tables = [r.block_table[:num_blocks] + [0] * (num_blocks - len(r.block_table)) for r in rows]  # null-padded
        # Built as Python lists, one tensor each: a draft's step is one short row, where per-op cost rules.
        ids = torch.tensor([r.tokens + [0] * (width - k) for r, k in zip(rows, lens)])
        last = self.max_len - 1
        positions = torch.tensor([[min(r.start + t, last) for t in range(width)] for r in rows])
        first = tables[0][0]
        if n == 1 and tables[0] == list(range(first, first + num_blocks)):
            # The usual case of one sequence (a draft's step, a lone decode): its blocks were handed
            # out in order, so what it reads is one slice of the cache, the same values in the same layout.
            read_slots = None
        else:
            slots = torch.tensor(tables)[:, :, None] * bs + torch.arange(bs)  # [n, num_blocks, bs]
            read_slots = slots.view(n, -1)[:, :kv_len].reshape(-1).to(dev)
        write_slot = [tb[p // bs] * bs + p % bs for r, tb in zip(rows, tables)
                      for p in range(r.start, r.start + len(r.tokens))]
        j = torch.arange(kv_len)
        mask = j[None, None, :] <= positions[:, :, None]  # causal within each row's own positions
        write_rows = None
        if min(lens) < width:
            valid = torch.arange(width)[None, :] < torch.tensor(lens)[:, None]  # [n, width]
            write_rows = tuple(x.to(dev) for x in valid.nonzero(as_tuple=True))
            # Padded queries see only position 0, so softmax stays finite; their output is dropped.
            mask = torch.where(valid[:, :, None], mask, j[None, None, :] == 0)
        self.cache.ensure_clean(max(max(tb) for tb in tables) + 1)
        keep_index = None
        if write_rows is not None or any(r.keep != width for r in rows):
            keep_index = torch.tensor([i * width + p for i, (r, k) in enumerate(zip(rows, lens))
                                       for p in range(k - r.keep, k)], device=dev)
        return _StepContext(
            cache=self.cache, ids=ids.to(dev), positions=positions.to(dev), mask=mask[:, None].to(dev),
            keep_index=keep_index, keeps=[r.keep for r in rows], write_rows=write_rows,
            write_slot=torch.tensor(write_slot, device=dev), read_slots=read_slots, kv_len=kv_len,
            read_start=first * bs, max_position=min(max(r.start for r in rows) + width - 1, last),
        )

    @torch.inference_mode()
    def embed(self, ctx: _StepContext) -> torch.Tensor:
        """Input embeddings ``[n, width, hidden]`` (first stage only)."""
        if self.lean is not None:
            return self.lean.embed(ctx.ids)
        return self._decoder.embed_tokens(ctx.ids)

    @torch.inference_mode()
    def run_layers(self, hidden: torch.Tensor, ctx: _StepContext) -> torch.Tensor:
        """Runs this runner's decoder layers over ``hidden`` ``[n, width, hidden]``."""
        self._ctx = ctx
        if self.lean is not None:
            try:
                return self.lean.run_layers(hidden, ctx.positions, self._paged_attention, ctx.max_position)
            finally:
                self._ctx = None
        position_embeddings = self._decoder.rotary_emb(hidden, position_ids=ctx.positions)
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
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if ctx.keep_index is not None:
            hidden = hidden.index_select(0, ctx.keep_index)
        logits = self.lean.head(hidden) if self.lean is not None else self._lm_head(self._decoder.norm(hidden))
        return list(logits.float().split(ctx.keeps))

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
