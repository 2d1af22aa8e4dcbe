"""Linear layers with their weights pre-packed for oneDNN, for CPU serving.

torch's default CPU path for ``F.linear`` (MKL sgemm) repacks the weight on
every call once the input has two or more rows. For a model whose weights do
not fit in cache, that repacking, not the arithmetic, is the cost: on the
2-core build machine a 2752x1024 layer stack took 25 ms for one row, 37 ms
for five and 70 ms for 32. With the weight packed once into oneDNN's blocked
layout the same stack took 13, 10 and 30 ms. Speculative verification (a few
rows per sequence) pays for that difference most, since it is exactly the
"more than one row" case.

This is the op PyTorch's own compiler uses on CPU when it freezes a model
(``torch.ops.mkldnn._linear_pointwise`` over ``_reorder_linear_weight``), and
what intel-extension-for-pytorch's ``optimize`` does; we call it directly
instead of compiling because the engine's shapes change every step. The
model is still loaded by transformers' ``from_pretrained``; only the modules'
weights change layout. Where the op is missing or does not reproduce
``F.linear`` on a probe, nothing is changed.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: The batch size oneDNN tunes the packed layout for; 5 and 32 measured the same.
BATCH_HINT = 32
#: Smaller weights stay with ``F.linear``. A packed call has a fixed cost (about
#: 15 us on one thread, 80-90 us when it wakes a second one), which a small
#: weight, read from cache anyway, never earns back: a 688x256 layer took 16 us
#: unpacked against 85 packed for one row on 2 threads. From 2^20 elements
#: (4 MiB in float32, twice this machine's L2) packing won or tied at every
#: row count measured.
MIN_ELEMENTS = 1 << 20
_DTYPES = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Module):
    """``nn.Linear`` for inference, its weight in oneDNN's packed layout."""

    def __init__(self, linear: nn.Linear, batch_hint: int = BATCH_HINT) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # Plain attributes, not parameters: a packed (mkldnn-layout) tensor is not
        # something to train or save.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_features]`` -> ``[..., out_features]``, as ``F.linear``."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        """What ``repr(model)`` shows of this layer."""
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def supported(dtype: torch.dtype = torch.float32) -> bool:
    """Whether packed linears work here and agree with ``F.linear`` on a probe."""
    if dtype not in _DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        layer = nn.Linear(64, 48).to(dtype)
        x = torch.randn(3, 64, generator=gen).to(dtype)
        with torch.inference_mode():
            got, want = PackedLinear(layer)(x), F.linear(x, layer.weight, layer.bias)
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        log.info("oneDNN packed linears unavailable (%s); using F.linear", exc)
        return False
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return got.shape == want.shape and bool(torch.allclose(got.float(), want.float(), atol=tol, rtol=tol))


def prepack_linears(model: nn.Module, batch_hint: int = BATCH_HINT, min_elements: int = MIN_ELEMENTS) -> int:
    """Replaces every CPU ``nn.Linear`` of ``model`` with a weight of at least
    ``min_elements`` elements by a :class:`PackedLinear`.

    Returns how many were replaced (0 when the model is not on the CPU, its
    dtype is not float32/bfloat16, or the op is unsupported here). Tied
    weights stay tied where they are read as weights (the embedding); the
    output projection gets its own packed copy.
    """
    params = list(model.parameters())
    if not params or params[0].device.type != "cpu" or not supported(params[0].dtype):
        return 0
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if (type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype in _DTYPES
                    and child.weight.numel() >= min_elements):
                setattr(module, name, PackedLinear(child, batch_hint))
                count += 1
    return count


__all__ = ["PackedLinear", "prepack_linears", "supported"]
