"""The alert loop: evaluate the rules periodically and fan alerts out to watchers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from monitor.analysis import Alert, AlertTracker, Severity, Thresholds, analyze
from monitor.metrics import Scope
from monitor.store import Snapshot
from services.common.errors import ResourceExhausted

log = logging.getLogger(__name__)

#: Alerts a slow watcher may fall behind by before it is cut off.
QUEUE_BOUND = 1024


class _Watcher:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Alert] = asyncio.Queue(QUEUE_BOUND)
        self.overflowed = False


class AlertHub:
    """Runs :func:`analyze` over the fleet every ``interval_s`` and publishes what fires or clears."""

    def __init__(self, snapshot: Callable[[], Snapshot], tracker: AlertTracker, *, window_s: float,
                 interval_s: float, clock: Callable[[], float], thresholds: Thresholds = Thresholds()) -> None:
        self._snapshot = snapshot
        self._tracker = tracker
        self._window_s = window_s
        self._interval_s = interval_s
        self._clock = clock
        self._thresholds = thresholds
        self._watchers: set[_Watcher] = set()
        #: Replaced whole after each evaluation, so another thread may read it.
        self.firing: tuple[Alert, ...] = ()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="monitor-alerts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def evaluate(self) -> list[Alert]:
        """One evaluation: the alerts that changed, already published."""
        now = self._clock()
        recs = analyze(self._snapshot(), self._window_s, Scope(), now, self._thresholds).recommendations
        changed = self._tracker.update(recs, now)
        self.firing = tuple(self._tracker.firing())
        for alert in changed:
            log.log(logging.WARNING if alert.firing else logging.INFO, "alert %s %s [%s]: %s",
                    alert.rule, "firing" if alert.firing else "cleared", alert.subject or "fleet", alert.message)
            for watcher in list(self._watchers):
                try:
                    watcher.queue.put_nowait(alert)
                except asyncio.QueueFull:
                    watcher.overflowed = True
                    self._watchers.discard(watcher)
        return changed

    async def _loop(self) -> None:
        while True:
            try:
                self.evaluate()
            except Exception:  # noqa: BLE001 - one bad evaluation must not end the alerts
                log.exception("alert evaluation failed")
            await asyncio.sleep(self._interval_s)

    async def watch(self, min_severity: Severity | None):
        """Yields the alerts firing now, then every alert as it fires or clears."""
        watcher = _Watcher()
        self._watchers.add(watcher)
        try:
            for alert in self.firing:
                if min_severity is None or alert.severity >= min_severity:
                    yield alert
            while True:
                if watcher.overflowed and watcher.queue.empty():
                    raise ResourceExhausted(f"this watcher fell more than {QUEUE_BOUND} alerts behind; "
                                            "call WatchAlerts again")
                alert = await watcher.queue.get()
                if min_severity is None or alert.severity >= min_severity:
                    yield alert
        finally:
            self._watchers.discard(watcher)
