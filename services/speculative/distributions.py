"""Token distributions on the wire (TokenDistribution ⇄ dense tensor)."""

from __future__ import annotations

import numpy as np
import torch

from services.common.stubs import model_pb2


def distribution_pb(probs: torch.Tensor) -> model_pb2.TokenDistribution:
    """The wire form of a ``[vocab]`` distribution: dense when most tokens have
    mass, sparse (exact) when top-k/top-p truncated it. Any thread."""
    p = probs.detach().float().cpu().numpy()
    nonzero = np.flatnonzero(p)
    if len(nonzero) < len(p) // 2:
        return model_pb2.TokenDistribution(ids=nonzero.tolist(), probs=p[nonzero].astype("<f4").tobytes())
    return model_pb2.TokenDistribution(probs=p.astype("<f4").tobytes())


def distribution_of(d: model_pb2.TokenDistribution, vocab_size: int) -> torch.Tensor:
    """The dense ``[vocab_size]`` float32 distribution a TokenDistribution stands
    for. Raises IndexError when a sparse id is outside the vocabulary."""
    values = torch.from_numpy(np.frombuffer(d.probs, dtype="<f4").copy())
    if not d.ids:
        return values
    dense = torch.zeros(vocab_size)
    dense[torch.tensor(list(d.ids), dtype=torch.long)] = values
    return dense
