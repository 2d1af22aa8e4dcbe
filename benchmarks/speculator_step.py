"""What the Speculator's own Python costs per engine step, where speculation is enabled but does not pay.

An offline measurement (not a test, not part of ``llmesh bench``): a
:class:`~services.speculative.speculator.Speculator` with ``--streams``
sequences (each with the n-gram fallback, as a served request that did not pin
its method), taught that verifying costs more than it saves (so it decides
gamma 0 at every step, as at 16-32 streams on two cores), then stepped through
its named points (``before_schedule``, ``after_forward``, ``after_tokens`` for
every sequence) with the batch alternating between ``streams`` and
``streams - 1`` running, as a served load's does when streams end and begin.
No model and no engine: only the strategy's own work, which the plain arm of
``llmesh bench --scenario speculative`` does not pay. Prints microseconds per
step (``time.perf_counter``, the median of ``--repeats`` timings).

    python benchmarks/speculator_step.py [--streams 32] [--steps 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from services.engine.scheduler import Row
from services.engine.sequence import GenerationRequest, SamplingOptions, Sequence, Status
from services.speculative.gamma import SpeculationSettings
from services.speculative.ngram import LocalNgramProposer
from services.speculative.speculator import Speculator
from services.speculative.state import Proposal, SpeculationRequest


class _Instant:
    """A draft that answers every round at once with all-ones proposals."""

    def propose(self, round_, on_result):
        on_result(Proposal([1] * round_.gamma), None)

    def close(self):
        pass


def _sequences(speculator: Speculator, n: int) -> list[Sequence]:
    seqs = []
    for _ in range(n):
        request = GenerationRequest(prompt_ids=[1, 2, 3], sampling=SamplingOptions(max_new_tokens=1 << 20))
        seq = Sequence(request=request, sink=lambda ev: None, arrival=0.0)
        seq.tokens, seq.status = [1, 2, 3], Status.RUNNING
        seq.spec = speculator.open(SpeculationRequest(_Instant(), fallback=LocalNgramProposer), post=lambda fn: fn(0.0))
        seqs.append(seq)
    return seqs


def measure(streams: int, steps: int) -> float:
    """Microseconds per step of the Speculator alone at ``streams`` sequences."""
    speculator = Speculator(SpeculationSettings(explore_s=1e9))
    seqs = _sequences(speculator, streams)
    now = 1.0
    for _ in range(10):  # plain steps: 55 ms forward, 8 ms gap
        speculator.after_forward([Row(seqs[0], 0, 3)], 0.0, now)
        now += 0.063
        speculator.after_forward([Row(s, 0, 1) for s in seqs], 0.055, now)
    for _ in range(6):  # verifying 5 tokens a row costs 0.4 s and keeps 2 of 4: speculation does not pay
        speculator.before_schedule(seqs, streams)
        now += 0.4
        rows = [Row(s, 0, 1, [1] * 4) for s in seqs]
        for s in seqs:
            s.spec.sync.next_round(s.tokens, 4)
        speculator.after_forward(rows, 0.4, now)
        for s in seqs:
            s.spec.control.update(2, 4)

    def step(i: int) -> None:
        nonlocal now
        running = seqs if i % 2 else seqs[:-1]
        speculator.before_schedule(running, len(running))
        now += 0.063
        speculator.after_forward([Row(s, 0, 1) for s in running], 0.055, now)
        for s in running:
            speculator.after_tokens(s, now, len(running), 100)

    for i in range(50):
        step(i)
    assert speculator.gamma == 0, "the set-up should have taught it not to speculate"
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    return (time.perf_counter() - started) / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runs = [measure(args.streams, args.steps) for _ in range(args.repeats)]
    print(f"speculator per step at {args.streams} streams (gamma 0, batch alternating "
          f"{args.streams}/{args.streams - 1}): {statistics.median(runs):.0f} us "
          f"(runs: {', '.join(f'{r:.0f}' for r in runs)})")


if __name__ == "__main__":
    main()
