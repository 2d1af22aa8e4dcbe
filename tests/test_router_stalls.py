"""The stall watch alone (router/stalls.py): which streams it cuts, with a fake registry and clock."""

from __future__ import annotations

from dataclasses import dataclass

from router.stalls import StallWatch


@dataclass
class FakeInstance:
    load_at: float | None

    def load_age(self, now: float) -> float | None:
        return None if self.load_at is None else now - self.load_at


class FakeRegistry:
    def __init__(self, **instances: FakeInstance) -> None:
        self.instances = instances

    def find(self, instance_id: str) -> FakeInstance | None:
        return self.instances.get(instance_id)


class FakeCall:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def test_only_a_silent_stream_on_a_silent_target_that_can_move_is_cut():
    now = [100.0]
    registry = FakeRegistry(frozen=FakeInstance(load_at=97.0), busy=FakeInstance(load_at=99.9),
                            new=FakeInstance(load_at=None))
    watch = StallWatch(registry, stale_after_s=2.0, clock=lambda: now[0])
    now[0] = 97.0
    silent = watch.open("frozen", lambda: True, FakeCall())
    stuck = watch.open("frozen", lambda: False, FakeCall())  # nowhere to go: it waits
    long_prefill = watch.open("busy", lambda: True, FakeCall())  # reports come: never cut
    never = watch.open("new", lambda: True, FakeCall())  # no report yet: not judged by them
    now[0] = 99.5
    talking = watch.open("frozen", lambda: True, FakeCall())  # a chunk 0.5 s ago
    now[0] = 100.0
    assert watch.sweep() == [silent]
    assert silent.call.cancelled and "frozen stopped answering: no chunk for 3.0 s" in silent.lost
    assert not any(c.call.cancelled or c.lost for c in (stuck, long_prefill, never, talking))
    assert watch.sweep() == []  # cut once
    for live in (silent, stuck, long_prefill, never, talking):
        watch.close(live)
    assert watch.sweep() == [] and not watch._live
