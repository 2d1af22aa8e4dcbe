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
(:func:`packing_ratios`) and the weights are packed only where packing is
faster on this machine.

Where packing is faster for several rows but slower for one, as on the
AVX512/AMX build machine (2026-12-01: a 1024x3072 layer took 227 us plain
and 286 packed for one row, but 455 plain and 276 packed for four: MKL's
sgemm repacks from four rows on, so a verify of gamma + 1 = 4 tokens cost
twice a decode step), each large layer keeps both layouts
(:class:`DualLinear`) and a product takes the packed one from the row count
where it was measured to be faster on: decode steps keep plain speed and
verify and batch steps lose the cliff, at the memory of a second copy of
those weights (taken only while it is under :data:`DUAL_MEMORY_SHARE` of
the memory available).
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


class DualLinear(nn.Module):
    """``nn.Linear`` for inference with its weight in both layouts: ``F.linear``
    (the module's own ``weight``) for products of fewer than ``packed_from``
    rows, oneDNN's packed copy from there on. A product's rows are every
    leading dimension of its input (``x.numel() // in_features``)."""

    def __init__(self, linear: nn.Linear, packed_from: int, batch_hint: int = BATCH_HINT) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.packed_from = packed_from
        #: Input elements from which a product takes the packed weight.
        self.packed_from_elements = packed_from * linear.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_features]`` -> ``[..., out_features]``, as ``F.linear``."""
        if x.numel() >= self.packed_from_elements:
            return self.packed_forward(x)
        return F.linear(x, self.weight, self.bias)

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The product with the packed weight, whatever the row count."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        """What ``repr(model)`` shows of this layer."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"packed=oneDNN from {self.packed_from} rows")


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


#: Row counts the start-up timing compares at: a decode row, small batches and verifies (gamma + 1).
PROBE_ROWS = (1, 2, 3, 4, 5, 6, 8)
#: Packing must beat F.linear by this much on a row count to be taken there...
PAYS_BELOW = 0.95
#: ...and, to replace F.linear outright, cost at most this much more on one row (timing noise); slower
#: than that, both layouts are kept (:class:`DualLinear` is never slower than either, it costs memory).
#: 2026-12-01: at 1.10, one start-up beside a starting draft and router timed 1-row packing under it
#: (quiet, six timings: 1.16-1.27x), replaced F.linear outright, and target-only decoding at one stream
#: read 42.8 tokens/s against 54.6 with both layouts in the run before.
ONE_ROW_AT_MOST = 1.02
#: The largest share of the memory available (``MemAvailable``) a second copy of the large weights may take
#: for :class:`DualLinear`; past it, one layout is kept as before.
DUAL_MEMORY_SHARE = 0.25


def _median_s(fn, x: torch.Tensor, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def packing_ratios(layer: nn.Linear, reps: int = 7, rows: tuple[int, ...] = PROBE_ROWS) -> dict[int, float]:
    """Times ``layer`` plain (``F.linear``) and packed on each count of
    ``rows`` (median of ``reps`` each, after a warm-up call each) on the
    calling thread. Returns packed / plain time per row count."""
    packed = PackedLinear(layer)
    plain = lambda x: F.linear(x, layer.weight, layer.bias)  # noqa: E731
    ratios = {}
    with torch.inference_mode():
        for n in rows:
            x = torch.randn(n, layer.in_features, dtype=layer.weight.dtype)
            plain(x), packed(x)  # warm-up: first calls allocate
            t_plain = _median_s(plain, x, reps)
            t_packed = _median_s(packed, x, reps)
            ratios[n] = t_packed / t_plain if t_plain > 0 else 1.0
    return ratios


def packed_from(ratios: dict[int, float]) -> int | None:
    """The fewest rows from which packing was faster (ratio below
    :data:`PAYS_BELOW`) at every row count measured, None where it was not
    faster at the most rows measured. Pure."""
    start = None
    for n in sorted(ratios, reverse=True):
        if ratios[n] >= PAYS_BELOW:
            break
        start = n
    return start


def _available_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def prepack_linears(model: nn.Module, batch_hint: int = BATCH_HINT, min_elements: int = MIN_ELEMENTS,
                    measure: bool = True, dual_from: int | None = None) -> int:
    """Replaces every CPU ``nn.Linear`` of ``model`` with a weight of at least
    ``min_elements`` elements by a :class:`PackedLinear`, or by a
    :class:`DualLinear` where packing pays only from some row count on.

    With ``measure``, the largest such layer is timed plain and packed
    (:func:`packing_ratios`; well under a second at start-up): packed
    outright where packing is faster from several rows on and not clearly
    slower on one; both layouts where it is faster from some row count on
    but slower on one row and the second copy fits in
    :data:`DUAL_MEMORY_SHARE` of the memory available; left as they are
    otherwise. Without ``measure``: packed outright, or with ``dual_from``
    both layouts, the packed one from that many rows (for tests).

    Returns how many were replaced (0 when the model is not on the CPU, its
    dtype is not float32/bfloat16, the op is unsupported here, or packing
    does not pay). Tied weights stay tied where they are read as weights
    (the embedding); the output projection gets its own packed copy.
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
        ratios = packing_ratios(largest)
        shown = ", ".join(f"{rows} rows {r:.2f}x" for rows, r in ratios.items())
        start = packed_from(ratios)
        dual_from = None
        if start is None:
            log.info("oneDNN packed linears are slower here (packed/plain time: %s); using F.linear", shown)
            return 0
        if ratios[min(ratios)] > ONE_ROW_AT_MOST:
            extra = sum(child.weight.numel() * child.weight.element_size() for _, _, child in eligible)
            available = _available_bytes()
            if available is None or extra > DUAL_MEMORY_SHARE * available:
                log.info("oneDNN packed linears pay only from %d rows here (packed/plain time: %s), and a second "
                         "copy of %.0f MiB of weights is over %.0f%% of the memory available; using F.linear",
                         start, shown, extra / 2**20, DUAL_MEMORY_SHARE * 100)
                return 0
            dual_from = start
            log.info("oneDNN packed linears pay from %d rows here (packed/plain time: %s): both layouts kept "
                     "(%.0f MiB more)", start, shown, extra / 2**20)
        else:
            log.info("oneDNN packed linears pay here (packed/plain time: %s)", shown)
    for module, name, child in eligible:
        setattr(module, name, PackedLinear(child, batch_hint) if dual_from is None
                else DualLinear(child, dual_from, batch_hint))
    return len(eligible)


def weight_layout(model: nn.Module) -> str:
    """How ``model``'s linear layers hold their weights, as reports say it:
    "plain" (``F.linear``'s layout everywhere), "packed" (oneDNN's packed
    layout in every replaced layer, see :class:`PackedLinear`), or
    "both, packed from N rows" (:class:`DualLinear`, the smallest ``N`` of its
    layers). Pure: reads the modules, times nothing."""
    dual = [m.packed_from for m in model.modules() if isinstance(m, DualLinear)]
    if dual:
        return f"both, packed from {min(dual)} rows"
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        return "packed"
    return "plain"


__all__ = ["DualLinear", "PackedLinear", "packed_from", "packing_ratios", "prepack_linears", "supported",
           "weight_layout"]
