"""A lean forward for Llama-family decoder layers: the same tensor ops as
transformers' ``LlamaDecoderLayer``, in the same order and dtypes, without
its module tree.

transformers runs a Llama layer through about fifteen ``nn.Module`` calls,
deprecation and kernel-hub wrappers, keyword plumbing and an attention
registry lookup. For a small model on a CPU that Python, not the
arithmetic, is the cost of a step: the 0.36 M-parameter built draft spent
~1.5 ms per one-token forward on the 2-core build machine, almost all of it
outside the kernels. This module reads each layer's own weights once (after
:func:`services.engine.cpu_linear.prepack_linears` has packed the large
ones) and replays the layer's ops directly: RMSNorm, q/k/v projections,
rotary embedding, the runner's paged attention, o-projection, residual,
RMSNorm, gated MLP, residual, as ``modeling_llama`` computes them, so the
logits are the same bit for bit (the runner checks that on a probe at
start-up and keeps transformers' path when they are not). The model is
still loaded by ``from_pretrained``, and the rotary embedding's cos/sin still
come from its own module (once per forward, so every RoPE type transformers
has, dynamic ones included, is as transformers computes it); what cannot be
replayed exactly (another architecture, a module whose forward was swapped, a
sharded layer) keeps transformers' path: :func:`unsupported` says why.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama import modeling_llama as hf

from services.engine.cpu_linear import DualLinear, PackedLinear

#: paged_attention(layer_index, query, key, value, scaling) -> [n, width, heads, head_dim]
#: (query/key/value as transformers' attention functions get them: ``[n, heads, width, head_dim]``).
Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _linear(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's own product, without ``nn.Module.__call__``."""
    if type(module) in (PackedLinear, DualLinear):
        return module.forward
    weight, bias = module.weight, module.bias
    return lambda x: F.linear(x, weight, bias)


#: A fused weight's row slices must start on this many bytes (torch's own
#: allocation alignment), so that a product over a slice runs the kernel path
#: it ran over the layer's own tensor.
_ALIGN = 64


def _fused(modules: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """One product for plain linear layers that read the same input (q/k/v,
    gate/up): their weights concatenated by rows, one product ``[N, sum of
    their widths]`` whose column blocks are their outputs in order, as
    vLLM's ``QKVParallelLinear`` and ``MergedColumnParallelLinear`` do. Each
    output column is the same dot product over the same row, so the values are
    the ones the separate products give (the runner's probe checks it; the
    caller makes an output contiguous before an op whose vectorised loop
    rounds differently from its strided one, such as the activation). The
    layers' own weights (and biases) become row slices of the fused tensor:
    no memory is added, and transformers' modules read the same storage.
    Layers that keep both layouts (:class:`~services.engine.cpu_linear.DualLinear`,
    all from the same row count) fuse their plain weights alike; from that
    row count on the product is theirs, packed, one after the other (a
    packed product's fixed cost is small beside the weights it reads, and
    transformers' path computes the same). None, changing nothing, where the
    layers cannot be fused exactly: one is packed only or not a linear layer,
    dtypes, devices or input widths differ, only some have a bias, or a slice
    would start unaligned."""
    kinds = {type(m) for m in modules}
    if kinds == {DualLinear}:
        if len({m.packed_from for m in modules}) != 1:
            return None
    elif kinds != {nn.Linear}:
        return None
    weights = [m.weight for m in modules]
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
        return None
    biases = [m.bias for m in modules]
    if any(b is None for b in biases) != all(b is None for b in biases):
        return None
    row_bytes = weights[0].shape[1] * weights[0].element_size()
    offsets = [sum(w.shape[0] for w in weights[:i]) for i in range(len(weights))]
    if any(o * row_bytes % _ALIGN or (biases[0] is not None and o * weights[0].element_size() % _ALIGN)
           for o in offsets):
        return None
    with torch.no_grad():
        weight = torch.cat([w.detach() for w in weights])
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    for m, start in zip(modules, offsets):
        rows = m.weight.shape[0]
        m.weight.data = weight[start:start + rows]
        if bias is not None:
            m.bias.data = bias[start:start + rows]
    if kinds == {DualLinear}:
        packed = [m.packed_forward for m in modules]
        from_elements = modules[0].packed_from_elements

        def product(x: torch.Tensor) -> torch.Tensor:
            if x.numel() >= from_elements:
                return torch.cat([p(x) for p in packed], dim=-1)
            return F.linear(x, weight, bias)
        return product
    return lambda x: F.linear(x, weight, bias)


def _act(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return F.silu if type(module) in (SiLUActivation, nn.SiLU) else module.forward


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward``, op for op (its casts only where the dtype is not float32)."""
    input_dtype = hidden.dtype
    if input_dtype is not torch.float32:
        hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * (hidden if input_dtype is torch.float32 else hidden.to(input_dtype))


def unsupported(model, layers: range) -> str | None:
    """Why the lean path cannot replay ``model`` exactly (None: it can).
    ``layers``: the decoder layers the runner holds (all of them, or it is a
    pipeline stage, which keeps transformers' path)."""
    if type(model) is not hf.LlamaForCausalLM:
        return f"{type(model).__name__} is not LlamaForCausalLM"
    if model.training:
        return "the model is in training mode (dropout)"
    decoder = model.get_decoder()
    if layers != range(model.config.num_hidden_layers) or len(decoder.layers) != len(layers):
        return "the runner holds a pipeline stage, not the whole model"
    expected = {hf.LlamaDecoderLayer, hf.LlamaAttention, hf.LlamaMLP, hf.LlamaRMSNorm, hf.LlamaRotaryEmbedding,
                nn.Linear, PackedLinear, DualLinear, SiLUActivation, nn.SiLU, nn.Embedding}
    parts = {"embed_tokens": decoder.embed_tokens, "norm": decoder.norm, "rotary_emb": decoder.rotary_emb,
             "lm_head": model.get_output_embeddings(),
             **{f"layers.{i}.{name}".rstrip("."): m for i, layer in enumerate(decoder.layers)
                for name, m in layer.named_modules()}}
    for name, module in parts.items():
        if type(module) not in expected:
            return f"module {name} is a {type(module).__name__}"
        if "forward" in vars(module):
            return f"module {name} has its forward replaced (a hub kernel?)"
    if type(model.get_output_embeddings()) not in (nn.Linear, PackedLinear, DualLinear):
        return "the LM head is not a linear layer"
    return None


class _Layer:
    """One decoder layer's weights and products, read once."""

    def __init__(self, layer: hf.LlamaDecoderLayer, fuse: bool) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.index = attn.layer_idx
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        #: Query heads (the key heads follow them in the fused q/k/v product).
        self.heads = attn.q_proj.out_features // attn.head_dim
        #: Width of the q and k blocks of the fused q/k/v product.
        self.qk_width = attn.q_proj.out_features + attn.k_proj.out_features
        self.in_norm = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.post_norm = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        qkv, gate_up = (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)
        #: x -> [N, q | k | v] and x -> [N, gate | up], one product each, where they fuse.
        self.qkv = _fused(list(qkv)) if fuse else None
        self.gate_up = _fused(list(gate_up)) if fuse else None
        self.gate_width = mlp.gate_proj.out_features
        #: How many of the two groups were fused.
        self.fused = (self.qkv is not None) + (self.gate_up is not None)
        #: The separate products, where a group did not fuse (None where it did).
        self.q, self.k, self.v = map(_linear, qkv) if self.qkv is None else (None, None, None)
        self.gate, self.up = map(_linear, gate_up) if self.gate_up is None else (None, None)
        self.o, self.down = _linear(attn.o_proj), _linear(mlp.down_proj)
        self.act = _act(mlp.act_fn)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    """``apply_rotary_pos_emb`` on ``x`` ``[n, width, heads, head_dim]`` with
    ``cos`` and the sign-flipped ``sin`` ``[n, width, 1, head_dim]``:
    ``x * cos + rotate_half(x) * sin``, where ``rotate_half(x) * sin`` =
    ``cat(-x2, x1) * sin`` = ``roll(x) * cat(-sin1, sin2)`` (a sign flip is exact,
    so each product is the same float)."""
    return (x * cos) + (torch.roll(x, half, -1) * sin)


class LeanLlama:
    """Runs a whole Llama decoder's layers (``run_layers``) and its final norm
    and LM head (``head``) with transformers' ops, without its modules.
    Build it after the weights are packed (it keeps references to the
    tensors it reads). Same threads as the runner that owns it.

    ``fuse``: each layer's q/k/v projections, and its gate/up projections,
    run as one product each where they can (:func:`_fused`; on a 2-core CPU
    this took a float32 1024-wide decode step from 30.1 to 27.1 ms: fewer
    kernels, each waking the second thread once). ``fused`` counts the
    fused groups."""

    #: Positions of cos/sin computed per call of the rotary module while the table is built: below
    #: torch's parallel grain (32768 elements), so no call is split between threads (see :meth:`_rope`).
    _TABLE_CHUNK = 256

    def __init__(self, model, fuse: bool = True) -> None:
        decoder = model.get_decoder()
        self._rotary = decoder.rotary_emb
        self._layers = [_Layer(layer, fuse) for layer in decoder.layers]
        self.fused = sum(layer.fused for layer in self._layers)
        self._norm = (decoder.norm.weight, decoder.norm.variance_epsilon)
        self._lm_head = _linear(model.get_output_embeddings())
        embed = decoder.embed_tokens
        self._embed_weight = embed.weight if type(embed) is nn.Embedding and embed.max_norm is None else None
        self._embed = embed
        head_dim = self._layers[0].head_dim if self._layers else 0
        rope_type = getattr(self._rotary, "rope_type", "dynamic")
        #: cos and sign-flipped sin ``[positions, head_dim]`` by position, for a RoPE whose
        #: frequencies do not change with the sequence's length; None: transformers' module each forward.
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._tabled = (isinstance(rope_type, str) and "dynamic" not in rope_type and rope_type != "longrope"
                        and head_dim % 32 == 0)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ``ids`` ``[n, width]``: ``[n, width, hidden]``."""
        if self._embed_weight is None:
            return self._embed(ids)
        return F.embedding(ids, self._embed_weight)

    def _rope(self, hidden: torch.Tensor, positions: torch.Tensor,
              max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and the sign-flipped sin (``cat(-sin1, sin2)``) at ``positions``
        ``[n, width]``: ``[n, width, 1, head_dim]`` in ``hidden``'s dtype.
        ``max_position``: the largest of ``positions``, known to the caller
        (read from the tensor when None, which waits for a GPU).

        For a static RoPE (default, linear, llama3, yarn: the module's
        frequencies never change) they are read from a table the rotary module
        itself filled, position by position, grown to the next power of two
        past the largest position asked: two index reads instead of the
        module's dozen ops a forward. The module computes each element alone
        (a product, cos/sin, a scaling), so a table row holds the values it
        returns for that position in any batch, provided every element takes
        the vectorised loop: ``head_dim`` a multiple of 32 (two AVX-512
        vectors of float32; a call's elements then never fall in a scalar
        tail) and no call split between threads (:attr:`_TABLE_CHUNK`). Other
        RoPE types (dynamic, longrope) and head sizes call the module each
        forward, as transformers does.

        One difference from transformers' path remains, and it is in the
        table's favour: a single forward of more than 1024 tokens gives torch's
        ``cos``/``sin`` more than its parallel grain, and torch splits it
        between threads where it may leave a scalar tail mid-tensor, so
        transformers' own values for a position can then differ in the last
        bit from the ones it computes in a smaller batch. The table's do not
        depend on the batch."""
        half = self._layers[0].head_dim // 2
        if not self._tabled:
            cos, sin = self._rotary(hidden, position_ids=positions)
            sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
            return cos.unsqueeze(2), sin.unsqueeze(2)
        need = (int(positions.max()) if max_position is None else max_position) + 1
        if self._table is None or self._table[0].shape[0] < need or self._table[0].dtype != hidden.dtype:
            size = max(self._TABLE_CHUNK, 1 << (need - 1).bit_length())
            parts = [self._rotary(hidden, position_ids=torch.arange(p, min(p + self._TABLE_CHUNK, size),
                                                                     device=hidden.device)[None])
                     for p in range(0, size, self._TABLE_CHUNK)]
            cos = torch.cat([c[0] for c, _ in parts])
            sin = torch.cat([s[0] for _, s in parts])
            self._table = (cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1))
        cos, sin = self._table
        return cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)

    def _qkv(self, layer: _Layer, x: torch.Tensor, n: int, width: int, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (rotated) and v of ``x`` ``[n * width, hidden]``, each ``[n, width, heads, head_dim]``.
        With a fused product, q and k are rotated as one tensor (the same ops on every element)."""
        d, half = layer.head_dim, layer.head_dim // 2
        if layer.qkv is None:
            q, k, v = (p(x).view(n, width, -1, d) for p in (layer.q, layer.k, layer.v))
            return _rotate(q, cos, sin, half), _rotate(k, cos, sin, half), v
        out = layer.qkv(x)
        qk = _rotate(out[:, :layer.qk_width].view(n, width, -1, d), cos, sin, half)
        return qk[:, :, :layer.heads], qk[:, :, layer.heads:], out[:, layer.qk_width:].view(n, width, -1, d)

    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, attention: Attention,
                   max_position: int | None = None) -> torch.Tensor:
        """Every decoder layer over ``hidden`` ``[n, width, hidden]`` at
        ``positions`` ``[n, width]`` (the largest ``max_position`` when the
        caller knows it); attention by ``attention`` (the runner's paged
        attention, which reads and writes the KV cache).

        The rewrites keep every value: the row-wise ops (norms, products) run
        on the ``[n * width, hidden]`` view, which is the matrix product
        ``F.linear`` computes for a contiguous 3-D input anyway; RoPE runs on
        the ``[n, width, heads, head_dim]`` layout before the heads move to
        dimension 1 (elementwise ops, so the same floats); its cos/sin come
        from :meth:`_rope`."""
        n, width, _ = hidden.shape
        cos, sin = self._rope(hidden, positions, max_position)
        hidden = hidden.reshape(n * width, -1)
        for layer in self._layers:
            residual = hidden
            x = _rms_norm(hidden, *layer.in_norm)
            q, k, v = self._qkv(layer, x, n, width, cos, sin)
            out = attention(layer.index, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layer.scaling)
            hidden = residual + layer.o(out.view(n * width, -1))
            residual = hidden
            x = _rms_norm(hidden, *layer.post_norm)
            if layer.gate_up is None:
                gate, up = layer.gate(x), layer.up(x)
            else:
                # A column slice of the fused product is strided; the activation's vectorised and scalar
                # loops round differently, so it gets the contiguous layout the separate product had.
                gate_up = layer.gate_up(x)
                gate, up = gate_up[:, :layer.gate_width].contiguous(), gate_up[:, layer.gate_width:]
            hidden = residual + layer.down(layer.act(gate) * up)
        return hidden.view(n, width, -1)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: ``[k, hidden]`` -> logits ``[k, vocab]`` in the model's dtype."""
        return self._lm_head(_rms_norm(hidden, *self._norm))


__all__ = ["LeanLlama", "unsupported"]
