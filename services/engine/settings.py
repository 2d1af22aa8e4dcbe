"""The engine's knobs (pure; each service exposes them as flags)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.common.errors import InvalidArgument

#: Longest ``max_wait_ms``: a request never waits more than a minute for companions.
MAX_WAIT_MS = 60_000.0


@dataclass
class EngineSettings:
    """Batching knobs (counts of sequences and tokens; ``max_wait_ms`` in ms).
    Replaced whole at a step boundary (``Engine.update_settings``), never mutated."""

    #: Most sequences in the running batch.
    max_batch_size: int = 32
    #: How long a new request may wait for companions before its prefill is forced.
    max_wait_ms: float = 2.0
    #: Token budget per step (decode tokens plus prefill chunks).
    max_batch_tokens: int = 2048
    #: Waiting requests beyond which new ones are refused.
    max_queue: int = 256
    #: KV-cache slots: sequences that may hold a cache at once (running or paused).
    num_slots: int = 64

    def validate(self) -> None:
        """Raises InvalidArgument naming the first invalid knob (the same checks
        for flags at start and ``Configure`` at run time)."""
        checks = [
            ("max_batch_size", self.max_batch_size >= 1, "must be >= 1"),
            ("max_wait_ms", math.isfinite(self.max_wait_ms) and 0 <= self.max_wait_ms <= MAX_WAIT_MS,
             f"must be a finite number of milliseconds in [0, {MAX_WAIT_MS:g}]"),
            ("max_batch_tokens", self.max_batch_tokens >= self.max_batch_size,
             f"must be >= max_batch_size ({self.max_batch_size})"),
            ("max_queue", self.max_queue >= 0, "must be >= 0"),
            ("num_slots", self.num_slots >= self.max_batch_size, f"must be >= max_batch_size ({self.max_batch_size})"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise InvalidArgument(name, f"{message}, got {getattr(self, name)}")
