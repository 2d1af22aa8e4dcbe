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
``F.linear`` on a probe, nothing is changed; and since what pays depends on
the CPU (oneDNN's kernels for AVX512 and AMX are not those for AVX2), the
packed and plain products of the model's largest layer are timed at start-up
(:func:`packing_pays`) and the weights are packed only where packing is
faster on this machine.
"""

from __future__ import annotations

import logging
import statistics
import time

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


#: Row counts the start-up timing compares at: a decode row and a verify of γ + 1 = 5.
PROBE_ROWS = (1, 5)
#: Packing must beat F.linear by this much on several rows...
PAYS_BELOW = 0.95
#: ...and cost at most this much more on one row.
ONE_ROW_AT_MOST = 1.10


def _median_s(fn, x: torch.Tensor, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def packing_pays(layer: nn.Linear, reps: int = 7) -> tuple[bool, dict[int, float]]:
    """Times ``layer`` plain (``F.linear``) and packed on :data:`PROBE_ROWS`
    rows (median of ``reps`` each, after a warm-up call each) on the calling
    thread. Returns whether packing pays: clearly faster on several rows
    (ratio below :data:`PAYS_BELOW`: a verify or a batch) and not clearly
    slower on one (ratio at most :data:`ONE_ROW_AT_MOST`: a lone decode, where
    both read the same weights and timing noise decides), and packed / plain
    time per row count (the ratios, for the log)."""
    packed = PackedLinear(layer)
    plain = lambda x: F.linear(x, layer.weight, layer.bias)  # noqa: E731
    ratios = {}
    with torch.inference_mode():
        for rows in PROBE_ROWS:
            x = torch.randn(rows, layer.in_features, dtype=layer.weight.dtype)
            plain(x), packed(x)  # warm-up: first calls allocate
            t_plain = _median_s(plain, x, reps)
            t_packed = _median_s(packed, x, reps)
            ratios[rows] = t_packed / t_plain if t_plain > 0 else 1.0
    return ratios[max(PROBE_ROWS)] < PAYS_BELOW and ratios[min(PROBE_ROWS)] <= ONE_ROW_AT_MOST, ratios


def prepack_linears(model: nn.Module, batch_hint: int = BATCH_HINT, min_elements: int = MIN_ELEMENTS,
                    measure: bool = True) -> int:
    """Replaces every CPU ``nn.Linear`` of ``model`` with a weight of at least
    ``min_elements`` elements by a :class:`PackedLinear`.

    Returns how many were replaced (0 when the model is not on the CPU, its
    dtype is not float32/bfloat16, the op is unsupported here, or, with
    ``measure``, packing the largest such layer is slower here: see
    :func:`packing_pays`; a few milliseconds at start-up). Tied
    weights stay tied where they are read as weights (the embedding); the
    output projection gets its own packed copy.
    """
    params = list(model.parameters())
    if not params or params[0].device.type != "cpu" or not supported(params[0].dtype):
        return 0
    eligible = [(module, name, child) for module in list(model.modules())
                for name, child in list(module.named_children())
                if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype in _DTYPES
                and child.weight.numel() >= min_elements]
    if not eligible:
        return 0
    if measure:
        largest = max((child for _, _, child in eligible), key=lambda c: c.weight.numel())
        pays, ratios = packing_pays(largest)
        shown = ", ".join(f"{rows} rows {r:.2f}x" for rows, r in ratios.items())
        if not pays:
            log.info("oneDNN packed linears are slower here (packed/plain time: %s); using F.linear", shown)
            return 0
        log.info("oneDNN packed linears pay here (packed/plain time: %s)", shown)
    for module, name, child in eligible:
        setattr(module, name, PackedLinear(child, batch_hint))
    return len(eligible)


__all__ = ["PackedLinear", "packing_pays", "prepack_linears", "supported"]
