"""Helpers shared by the engine-level speculation tests (no I/O)."""

from __future__ import annotations

from services.speculative.state import Proposal
from services.speculative.sync import DraftSync


class Recorder:
    """A sequence's sink: its tokens, texts, finish reason, error and last statistics."""

    def __init__(self):
        self.tokens, self.text, self.finish, self.error, self.spec = [], "", None, None, None
        self.texts: list[str] = []

    def __call__(self, ev):
        self.tokens += ev.token_ids
        self.text += ev.text
        self.texts += [self.text] * len(ev.token_ids)
        if ev.finish_reason is not None:
            self.finish, self.error, self.spec = ev.finish_reason, ev.error, ev.spec


class OracleProposer:
    """Proposes the tokens a reference run emitted at each position, except at
    every ``wrong_every``-th position (0: never), where it proposes a wrong
    one. Keeps the draft's side of the sync protocol to know the positions it
    is asked for; ``max_context`` as a draft service reports it."""

    def __init__(self, reference: list[int], prompt_len: int, wrong_every: int = 0, max_context=None):
        self.reference, self.prompt_len, self.wrong_every = reference, prompt_len, wrong_every
        self.max_context = max_context
        self.sync = DraftSync()
        self.rounds = 0
        self.asked: list[tuple[int, int]] = []  # (tokens the draft holds, gamma) per round

    def propose(self, round_, on_result):
        self.sync.apply(round_)
        self.asked.append((self.sync.synced, round_.gamma))
        start = self.sync.synced - self.prompt_len
        tokens = []
        for i in range(start, min(start + round_.gamma, len(self.reference))):
            right = self.reference[i]
            wrong = self.wrong_every and i % self.wrong_every == 0
            tokens.append((right + 1) % 300 if wrong else right)
        self.sync.proposed(len(tokens))
        self.rounds += 1
        on_result(Proposal(tokens), None)

    def close(self):
        pass
