"""The target/draft sync protocol of one ``DraftModel.Propose`` stream, in one place.

The draft keeps a sequence's KV cache between rounds, so both sides must
agree, round after round, on what that cache holds. Each side keeps a
:class:`DraftSync` and both update it by the same rules:

- the draft holds ``context[:synced]`` followed by its last proposal of
  ``proposal_len`` tokens, of which the target kept ``kept`` (the target
  only knows ``kept``; for the draft it is ``proposal_len - discard``);
- each round the target sends a :class:`Round`: ``discard`` = the rejected
  tail of the last proposal (``proposal_len - kept``), ``append`` = the
  target's tokens after the kept ones (its corrected or bonus token; the
  whole context in the first round), ``gamma`` = tokens to propose;
- after a round both sides have ``synced`` = the target's sequence length
  when it built the round, and ``kept`` is 0 until the target verifies.

Invariants (tests/test_sync.py checks them on their own):
``0 <= kept <= proposal_len``, ``0 <= discard <= proposal_len``, the first
round carries a non-empty context and discards nothing, gamma is in
``[1, MAX_GAMMA]``, and after every round the two sides' ``synced`` are equal.

A round the target gives up (timeout, dropped by batch size) is never
verified, so ``kept`` stays 0 and the next round discards all of it. Each
side calls its methods from one thread: the target's engine thread, the
draft's event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import InvalidArgument
from services.common.validation import check_gamma


@dataclass(frozen=True)
class Round:
    """One target-to-draft message: drop ``discard`` tokens, take ``append``,
    propose ``gamma`` tokens."""

    discard: int
    append: list[int]
    gamma: int


@dataclass
class DraftSync:
    """What the draft's cache holds of one sequence (see the module docstring)."""

    #: Tokens of the target's sequence the draft has, before its proposal.
    synced: int = 0
    #: Tokens of the draft's last proposal (its cache holds them).
    proposal_len: int = 0
    #: Of those, how many the target accepted.
    kept: int = 0
    #: Rounds so far.
    rounds: int = 0

    # -- the target's side ----------------------------------------------------
    def next_round(self, tokens: list[int], gamma: int) -> Round:
        """The round that brings the draft to ``tokens`` (the target's whole
        sequence now) and asks for ``gamma`` proposals. Until the proposal
        arrives, the draft is assumed to propose all ``gamma``."""
        round_ = Round(self.proposal_len - self.kept, tokens[self.synced + self.kept:], gamma)
        self.synced, self.proposal_len, self.kept = len(tokens), gamma, 0
        self.rounds += 1
        return round_

    def accepted(self, n: int) -> None:
        """The target verified the last proposal and kept its first ``n`` tokens."""
        if not 0 <= n <= self.proposal_len:
            raise ValueError(f"accepted {n} of a proposal of {self.proposal_len}")
        self.kept = n

    # -- both sides -------------------------------------------------------------
    def proposed(self, n: int) -> None:
        """The draft proposed ``n`` tokens this round (gamma, or fewer at its
        context limit)."""
        self.proposal_len = n

    # -- the draft's side ---------------------------------------------------------
    def apply(self, round_: Round) -> None:
        """Checks a round the target sent and applies it to this side's state.

        Raises InvalidArgument naming the field (gamma, append_tokens,
        discard) when the round breaks the protocol; the state is unchanged then.
        """
        check_gamma("gamma", round_.gamma)
        if self.rounds == 0 and not round_.append:
            raise InvalidArgument("append_tokens", "the first message must carry the whole context")
        if not 0 <= round_.discard <= self.proposal_len:
            raise InvalidArgument("discard", f"must be in [0, {self.proposal_len}] (the last proposal), "
                                             f"got {round_.discard}")
        self.kept = self.proposal_len - round_.discard
        self.synced += self.kept + len(round_.append)
        self.proposal_len, self.kept = 0, 0
        self.rounds += 1
