"""Helpers shared by the speculation and draft tests: sinks, proposers, requests, Propose streams."""

from __future__ import annotations

import asyncio

from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2
from services.speculative.state import Proposal
from services.speculative.sync import DraftSync


class Recorder:
    """A sequence's sink: its tokens, texts, logprobs, finish reason, error and last statistics."""

    def __init__(self):
        self.tokens, self.text, self.finish, self.error, self.spec = [], "", None, None, None
        self.texts: list[str] = []
        self.logprobs, self.prompt_logprobs = [], []

    def __call__(self, ev):
        self.tokens += ev.token_ids
        self.logprobs += ev.logprobs
        self.prompt_logprobs += ev.prompt_logprobs
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


def spec_request(prompt, n, spec=True, gamma=None, draft=None, method=None, **sampling) -> gen.GenerateRequest:
    """A token-id GenerateRequest of ``n`` tokens (EOS ignored), speculating or not."""
    req = gen.GenerateRequest(prompt=gen.Prompt(tokens=gen.TokenIds(ids=prompt)),
                              sampling=gen.SamplingParams(max_new_tokens=n, ignore_eos=True, **sampling))
    req.speculation.enabled = spec
    if method is not None:
        req.speculation.method = method
    if gamma is not None:
        req.speculation.gamma = gamma
    if draft is not None:
        req.draft_address = draft
    return req


async def run_stream(stub, req):
    """A whole Generate stream: its token ids and its last chunk."""
    chunks = [c async for c in stub.Generate(req)]
    return [t for c in chunks for t in c.token_ids], chunks[-1]


class Conversation:
    """Drives one Propose stream the way a target does."""

    def __init__(self, stub):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.call = stub.Propose(self._requests())

    async def _requests(self):
        while (msg := await self.queue.get()) is not None:
            yield msg

    async def round(self, **fields):
        await self.queue.put(model_pb2.ProposeRequest(**fields))
        return await self.call.read()

    async def close(self):
        await self.queue.put(None)
        self.call.cancel()
