"""The target/draft sync protocol of one ``DraftModel.Propose`` stream, in one place.

The draft keeps a sequence's KV cache between rounds, so both sides must
agree, round after round, on what that cache holds. Each side keeps a
:class:`DraftSync` and both update it by the same rules:

- after a round, the draft holds ``context[:synced]`` followed by its
  proposal; the target asked for ``asked`` (gamma) tokens and, once it has
  verified them, kept the first ``kept``;
- each round the target sends a :class:`Round`: ``discard = asked - kept``
  (the part of the last round's gamma it did not keep: rejected, or never
  verified because the proposal came too late or was dropped), ``append`` =
  the target's tokens after the kept ones (its corrected or bonus token; the
  whole context in the first round) and ``gamma`` = tokens to propose now;
- the draft, which knows how many it really proposed (``proposal_len``:
  gamma, or fewer at its context limit), keeps ``asked - discard`` of them and
  rolls back the rest (:meth:`DraftSync.apply` returns how many);
- after every round both sides have the same ``synced``: the target's
  sequence length when it built the round.

Counting ``discard`` against the gamma asked, not the tokens received, lets
the target build a round without waiting for the last proposal to arrive.

Invariants (tests/test_sync.py checks them on their own):
``0 <= kept <= asked`` (target); ``0 <= discard <= asked`` and
``asked - discard <= proposal_len`` (draft); the first round carries a
non-empty context and discards nothing; gamma is in ``[1, MAX_GAMMA]``.
Each side calls its methods from one thread: the target's engine thread,
the draft's event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import InvalidArgument
from services.common.validation import check_gamma


@dataclass(frozen=True)
class Round:
    """One target-to-draft message: ``discard`` of the last round's gamma were
    not kept, take ``append``, propose ``gamma`` tokens."""

    discard: int
    append: list[int]
    gamma: int


@dataclass
class DraftSync:
    """What the draft's cache holds of one sequence (see the module docstring)."""

    #: Tokens of the target's sequence the draft has, before its proposal.
    synced: int = 0
    #: Gamma of the last round.
    asked: int = 0
    #: Of those, how many the target kept (target side; 0 until verified).
    kept: int = 0
    #: Tokens the draft really proposed in the last round (draft side).
    proposal_len: int = 0
    #: Rounds so far.
    rounds: int = 0

    # -- the target's side ----------------------------------------------------
    def next_round(self, tokens: list[int], gamma: int) -> Round:
        """The round that brings the draft to ``tokens`` (the target's whole
        sequence now) and asks for ``gamma`` proposals."""
        round_ = Round(self.asked - self.kept, tokens[self.synced + self.kept:], gamma)
        self.synced, self.asked, self.kept = len(tokens), gamma, 0
        self.rounds += 1
        return round_

    def accepted(self, n: int) -> None:
        """The target verified the last proposal and kept its first ``n`` tokens.
        Raises ValueError for more than were asked for."""
        if not 0 <= n <= self.asked:
            raise ValueError(f"accepted {n} of a round of gamma {self.asked}")
        self.kept = n

    # -- the draft's side ---------------------------------------------------------
    def apply(self, round_: Round) -> int:
        """Checks a round the target sent, applies it and returns how many
        tokens the draft rolls back (its proposal's tail past the kept ones).

        Raises InvalidArgument naming the field (gamma, append_tokens,
        discard) when the round breaks the protocol; the state is unchanged then.
        """
        check_gamma("gamma", round_.gamma)
        if self.rounds == 0 and not round_.append:
            raise InvalidArgument("append_tokens", "the first message must carry the whole context")
        lowest = max(0, self.asked - self.proposal_len)
        if not lowest <= round_.discard <= self.asked:
            raise InvalidArgument("discard", f"must be in [{lowest}, {self.asked}] (the last round asked "
                                             f"for {self.asked}, {self.proposal_len} were proposed), "
                                             f"got {round_.discard}")
        kept = self.asked - round_.discard
        rollback = self.proposal_len - kept
        self.synced += kept + len(round_.append)
        self.asked, self.kept, self.proposal_len = round_.gamma, 0, 0
        self.rounds += 1
        return rollback

    def proposed(self, n: int) -> None:
        """The draft proposed ``n`` tokens this round (gamma, or fewer at its
        context limit)."""
        self.proposal_len = n
