"""Where each rank sits in a TP x PP group, and how layers are split into stages.

Pure functions of sizes (no torch.distributed), so they are tested directly.
Ranks are laid out stage-major, as in Megatron-LM: rank = stage * tp + tp_rank,
so a stage's tensor-parallel ranks are neighbours (on one node when they fit).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """Rank ``rank`` of ``tp * pp`` ranks."""

    tp: int
    pp: int
    rank: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.pp - 1

    def stage_ranks(self, stage: int) -> list[int]:
        """The tensor-parallel group of ``stage``."""
        return list(range(stage * self.tp, (stage + 1) * self.tp))

    @property
    def prev_rank(self) -> int | None:
        """Same tp_rank, previous stage (activations come from it)."""
        return None if self.first_stage else self.rank - self.tp

    @property
    def next_rank(self) -> int | None:
        """Same tp_rank, next stage (activations go to it)."""
        return None if self.last_stage else self.rank + self.tp

    @property
    def logits_rank(self) -> int:
        """The rank that hands the logits to rank 0: the last stage's tp_rank 0."""
        return (self.pp - 1) * self.tp


def balance_stages(layer_params: list[int], pp: int, first_extra: int = 0, last_extra: int = 0) -> list[range]:
    """Contiguous layer ranges, one per stage, minimising the largest stage's
    parameter count (the embedding, ``first_extra``, counts on the first stage;
    the final norm and LM head, ``last_extra``, on the last), as a pipeline's
    step is as slow as its largest stage. Exact (dynamic programming over
    split points, O(pp * L^2)); every stage gets at least one layer. Raises
    ValueError when there are fewer layers than stages."""
    n = len(layer_params)
    if not 1 <= pp <= n:
        raise ValueError(f"{pp} pipeline stages need at least {pp} decoder layers; the model has {n}")
    prefix = [0]
    for p in layer_params:
        prefix.append(prefix[-1] + p)

    def cost(stage: int, a: int, b: int) -> int:
        return prefix[b] - prefix[a] + (first_extra if stage == 0 else 0) + (last_extra if stage == pp - 1 else 0)

    inf = float("inf")
    # best[s][b]: the lowest max-stage cost placing layers [0, b) on stages 0..s.
    best = [[inf] * (n + 1) for _ in range(pp)]
    cut = [[0] * (n + 1) for _ in range(pp)]
    for b in range(1, n + 1):
        best[0][b] = cost(0, 0, b)
    for s in range(1, pp):
        for b in range(s + 1, n + 1):
            for a in range(s, b):
                c = max(best[s - 1][a], cost(s, a, b))
                if c < best[s][b]:
                    best[s][b], cut[s][b] = c, a
    bounds, b = [n], n
    for s in range(pp - 1, 0, -1):
        b = cut[s][b]
        bounds.append(b)
    bounds.append(0)
    bounds.reverse()
    return [range(bounds[i], bounds[i + 1]) for i in range(pp)]


def split_micro_batches(n: int, micro_batches: int) -> list[range]:
    """``n`` rows as at most ``micro_batches`` contiguous, near-equal ranges (none empty)."""
    m = max(1, min(micro_batches, n))
    q, r = divmod(n, m)
    out, a = [], 0
    for i in range(m):
        b = a + q + (1 if i < r else 0)
        out.append(range(a, b))
        a = b
    return out
