"""Exponential waits between reconnection attempts (pure: no clock, no sleeping)."""

from __future__ import annotations

import random


class Backoff:
    """Waits that double from ``initial_s`` up to ``max_s``, back to ``initial_s`` after ``reset()``.

    Without ``rng`` each wait is the cap itself (``initial_s``, ``2 * initial_s``,
    ... ``max_s``); with ``rng`` each is drawn uniformly from ``[cap / 2, cap]``
    (jitter, so that many clients that lost the same server do not come back
    in step). Seconds; the caller sleeps. Not thread-safe: one per loop.
    """

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._rng = rng
        self._attempt = 0

    def next(self) -> float:
        """The wait before the next attempt, in seconds; each call doubles the next cap."""
        cap = min(self.max_s, self.initial_s * 2 ** self._attempt)
        self._attempt = min(self._attempt + 1, 30)
        return cap if self._rng is None else self._rng.uniform(cap / 2, cap)

    def reset(self) -> None:
        """An attempt succeeded: the next wait is ``initial_s`` (or drawn below it) again."""
        self._attempt = 0
