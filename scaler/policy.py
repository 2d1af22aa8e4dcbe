"""Scaling policy: desired instances of a pool from its load (pure: no gRPC, no stubs, no clock).

:func:`decide` is a function of (metrics snapshot, policy, memory, now) and
returns the desired count, the reason with the figures behind it, and the
memory for the next call. The rule is Knative's and the Kubernetes HPA's:

    desired = ceil(current × load ÷ (target_utilization × capacity))

where ``current × load`` is the pool's demand in tokens/s over the stable
window and ``capacity`` is the tokens/s one instance sustains at saturation,
measured from the monitor (the median rate of instances that were saturated
for a whole window, over the last ten minutes; see :func:`learn_capacity`)
and, until measured, the policy's configured estimate. Around it:

- a tolerance band: no change while demand is within ``tolerance`` of the
  target utilisation of the current instances;
- stabilisation windows (HPA's ``behavior.*.stabilizationWindowSeconds``):
  scale up only once every recommendation of the last ``scale_up_window_s``
  asked for more, to the smallest of them; scale down likewise over
  ``scale_down_window_s``, to the largest;
- panic mode (Knative's KPA): when the short-window demand per instance
  exceeds ``panic_threshold`` × capacity, scale up at once, and hold every
  scale-down until a stable window has passed without that condition;
- bounds: the result is always within [min_instances, max_instances];
- a scale-up is measured before the next one (:func:`check_scale_up`): once
  the instances it started serve and a stable window has passed, the pool's
  measured capacity must have grown by at least half an instance's, else no
  scale-up until it is measured to grow or ``SCALE_UP_COOL_DOWN_S`` pass;
- the backend's limit (:class:`HostLimit`, e.g. the local backend's cores):
  no decision goes above it, and the reason says so.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument

DEFAULT_TARGET_UTILIZATION = 0.7
DEFAULT_TOLERANCE = 0.1
DEFAULT_SCALE_UP_WINDOW_S = 30.0
DEFAULT_SCALE_DOWN_WINDOW_S = 300.0
DEFAULT_DRAIN_TIMEOUT_S = 60.0
DEFAULT_PANIC_THRESHOLD = 2.0
#: No pool is ever asked for more instances than this, whatever the policy says.
MAX_INSTANCES = 1024
#: An instance saturated in at least this fraction of a window's reports ran at its capacity.
SATURATED = 0.9
#: Capacity is the median saturated rate seen this recently (the last one measured is kept after that).
CAPACITY_HORIZON_S = 600.0
_MAX_SAMPLES = 1000
#: A scale-up counts as having added capacity if the pool's grew by this share of one instance's.
MEANINGFUL_GROWTH = 0.5
#: After a scale-up that added no capacity, no scale-up for this long unless capacity is measured to grow.
SCALE_UP_COOL_DOWN_S = 300.0


@dataclass(frozen=True)
class Policy:
    """llmesh.v1.ScalingPolicy with its defaults applied."""

    min_instances: int = 1
    max_instances: int = 8
    target_utilization: float = DEFAULT_TARGET_UTILIZATION
    tolerance: float = DEFAULT_TOLERANCE
    scale_up_window_s: float = DEFAULT_SCALE_UP_WINDOW_S
    scale_down_window_s: float = DEFAULT_SCALE_DOWN_WINDOW_S
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    #: A fixed count set by ScaleTo; 0: automatic.
    manual_instances: int = 0
    #: Tokens/s per instance assumed until measured at saturation; 0: none (hold until measured).
    capacity_tokens_per_second: float = 0.0
    panic_threshold: float = DEFAULT_PANIC_THRESHOLD


#: Fields whose 0 (proto3's "unset") means the documented default.
_DEFAULTS = {"target_utilization": DEFAULT_TARGET_UTILIZATION, "tolerance": DEFAULT_TOLERANCE,
             "scale_up_window_s": DEFAULT_SCALE_UP_WINDOW_S, "scale_down_window_s": DEFAULT_SCALE_DOWN_WINDOW_S,
             "drain_timeout_s": DEFAULT_DRAIN_TIMEOUT_S, "panic_threshold": DEFAULT_PANIC_THRESHOLD}


def checked(policy: Policy, prefix: str = "policy.") -> Policy:
    """The policy with defaults for its zero fields; InvalidArgument names the first bad field."""
    p = dataclasses.replace(policy, **{k: v for k, v in _DEFAULTS.items() if getattr(policy, k) == 0})

    def bad(name: str, message: str) -> InvalidArgument:
        return InvalidArgument(prefix + name, f"{message}, got {getattr(p, name)}")

    if not 0 <= p.min_instances <= MAX_INSTANCES:
        raise bad("min_instances", f"must be in [0, {MAX_INSTANCES}]")
    if not 1 <= p.max_instances <= MAX_INSTANCES:
        raise bad("max_instances", f"must be in [1, {MAX_INSTANCES}]")
    if p.max_instances < p.min_instances:
        raise bad("max_instances", f"must be >= min_instances ({p.min_instances})")
    if not (math.isfinite(p.target_utilization) and 0 < p.target_utilization <= 1):
        raise bad("target_utilization", "must be in (0, 1] (0 means the default 0.7)")
    if not (math.isfinite(p.tolerance) and 0 <= p.tolerance < 1):
        raise bad("tolerance", "must be in [0, 1) (0 means the default 0.1)")
    for name in ("scale_up_window_s", "scale_down_window_s", "drain_timeout_s"):
        value = getattr(p, name)
        if not (math.isfinite(value) and value > 0):
            raise bad(name, "must be a finite number of seconds > 0 (0 means the default)")
    if not (math.isfinite(p.capacity_tokens_per_second) and p.capacity_tokens_per_second >= 0):
        raise bad("capacity_tokens_per_second", "must be a finite number >= 0 (0: measure it)")
    if not (math.isfinite(p.panic_threshold) and p.panic_threshold > 1):
        raise bad("panic_threshold", "must be a finite number > 1 (0 means the default 2)")
    check_manual(p.manual_instances, p, prefix + "manual_instances")
    return p


def check_manual(instances: int, policy: Policy, name: str = "instances") -> None:
    """A manual count must be 0 (automatic) or within the policy's bounds."""
    if instances == 0:
        return
    if not policy.min_instances <= instances <= policy.max_instances:
        raise InvalidArgument(name, f"must be 0 (automatic) or within the pool's bounds "
                                    f"[{policy.min_instances}, {policy.max_instances}], got {instances}")


def bounded(n: int, policy: Policy) -> int:
    return max(policy.min_instances, min(policy.max_instances, n))


@dataclass(frozen=True)
class HostLimit:
    """The most targets a backend can usefully run for a pool, and why (e.g. the local backend's
    ``"the host: 2 cores, 2 threads per target"``): more would share the same cores, not add capacity."""

    instances: int
    why: str

    def apply(self, desired: int, reason: str) -> tuple[int, str]:
        """``desired`` capped at the limit, the reason saying so when it was."""
        if desired <= self.instances:
            return desired, reason
        return self.instances, f"{reason}; capped at {self.instances} by {self.why}"


# -- the snapshot ---------------------------------------------------------------

@dataclass(frozen=True)
class WindowLoad:
    """A pool's load over one window, as the monitor measured it."""

    window_s: float
    #: Tokens/s the pool generated over the window.
    tokens_per_second: float
    #: Requests in flight (queued + running), newest reports.
    in_flight: int = 0
    #: Sequences in the running batches, newest reports.
    running: int = 0

    @property
    def demand(self) -> float:
        """Tokens/s the pool would generate if nothing waited: the served rate scaled by
        in flight ÷ running (a queued request would be served at the running ones' rate)."""
        if self.running > 0 and self.in_flight > self.running:
            return self.tokens_per_second * self.in_flight / self.running
        return self.tokens_per_second


@dataclass(frozen=True)
class InstanceLoad:
    """One instance over the stable window: what it generated and how saturated it was."""

    id: str
    tokens_per_second: float
    #: Fraction of the window's reports in which it could take no more work.
    saturation: float


@dataclass(frozen=True)
class PoolMetrics:
    """What :func:`decide` reads about a pool."""

    #: Instances serving or on their way (starting, warming); draining ones are not counted.
    current: int
    stable: WindowLoad | None = None
    #: The short window of panic mode; None: judged on the stable window.
    panic: WindowLoad | None = None
    instances: tuple[InstanceLoad, ...] = ()
    #: Why ``stable`` is missing (the monitor's error), if it is.
    error: str = ""
    #: Of ``current``, the instances still starting or warming up (not serving yet).
    starting: int = 0
    #: The backend's limit for this pool; None: unbounded (beyond max_instances).
    limit: HostLimit | None = None


@dataclass(frozen=True)
class Memory:
    """What a pool's policy remembers between decisions."""

    #: (time, bounded recommendation) of recent decisions, oldest first.
    recommendations: tuple[tuple[float, int], ...] = ()
    #: (time, tokens/s) of instances saturated for a whole window, oldest first.
    samples: tuple[tuple[float, float], ...] = ()
    #: The capacity last measured (kept once its samples have aged out).
    measured: float = 0.0
    #: When panic mode was last triggered; None: not in panic.
    last_panic: float | None = None
    #: The last scale-up, until it is shown to have added capacity (or not).
    scale_up: ScaleUp | None = None
    #: Set when a scale-up added no capacity: further scale-ups are held.
    stalled: Stall | None = None


@dataclass(frozen=True)
class ScaleUp:
    """A scale-up whose effect on the pool's capacity is still to be measured."""

    at: float
    #: Instances before it, and what it asked for.
    before: int
    to: int
    #: Capacity per instance (measured) when it was decided, and the pool's total then.
    per_instance: float
    total: float
    #: When its instances were all serving (none starting); None: not yet.
    completed_at: float | None = None


@dataclass(frozen=True)
class Stall:
    """A scale-up that did not add capacity: scale-ups are held from ``since``."""

    since: float
    #: The pool's measured capacity then, and one instance's before the scale-up.
    total: float
    per_instance: float
    why: str


@dataclass(frozen=True)
class Capacity:
    tokens_per_second: float
    #: True: measured at saturation; False: the policy's configured estimate.
    measured: bool

    def describe(self) -> str:
        how = "measured at saturation" if self.measured else "configured estimate, not yet measured at saturation"
        return f"capacity {self.tokens_per_second:.1f} tok/s per instance ({how})"


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    figures: dict[str, float] = field(default_factory=dict)
    memory: Memory = Memory()
    capacity: Capacity | None = None
    panic: bool = False


# -- the decision -----------------------------------------------------------------

def learn_capacity(memory: Memory, instances: tuple[InstanceLoad, ...], now: float) -> Memory:
    """Adds the rates of instances saturated for the whole window; forgets samples older than the horizon.

    The capacity is the median of the samples: a window's noise moves it in neither direction, and on
    instances that share a machine it is what each of them sustains next to the others."""
    new = tuple((now, i.tokens_per_second) for i in instances
                if i.saturation >= SATURATED and i.tokens_per_second > 0 and math.isfinite(i.tokens_per_second))
    samples = tuple(s for s in memory.samples + new if s[0] >= now - CAPACITY_HORIZON_S)[-_MAX_SAMPLES:]
    measured = statistics.median(v for _, v in samples) if samples else memory.measured
    return dataclasses.replace(memory, samples=samples, measured=measured)


def capacity(memory: Memory, policy: Policy) -> Capacity | None:
    if memory.measured > 0:
        return Capacity(memory.measured, True)
    if policy.capacity_tokens_per_second > 0:
        return Capacity(policy.capacity_tokens_per_second, False)
    return None


def _trim(recs: tuple[tuple[float, int], ...], now: float, horizon_s: float) -> tuple[tuple[float, int], ...]:
    """Drops recommendations older than the horizon, keeping the newest one at or before it
    (it tells whether a run of recommendations began before the window)."""
    start = 0
    while start + 1 < len(recs) and recs[start + 1][0] <= now - horizon_s:
        start += 1
    return recs[start:]


def _run_start(recs: tuple[tuple[float, int], ...], pred: Callable[[int], bool]) -> float | None:
    """When the trailing run of recommendations satisfying ``pred`` began (None: the newest does not)."""
    since = None
    for t, r in reversed(recs):
        if not pred(r):
            break
        since = t
    return since


def decide(metrics: PoolMetrics, policy: Policy, memory: Memory, now: float) -> Decision:
    """The pool's desired instances at ``now``, why, and the memory for the next decision.

    Named steps: recommend (the formula, tolerance, panic, windows, bounds: :func:`recommend`),
    hold a scale-up after one that added no capacity (:func:`check_scale_up`), cap at the
    backend's limit (:class:`HostLimit`), then remember a scale-up to check it later."""
    d = recommend(metrics, policy, memory, now)
    d = check_scale_up(d, metrics, policy, now)
    return _remember_scale_up(_apply_limit(d, metrics), metrics, policy, now)


def _automatic(metrics: PoolMetrics, policy: Policy) -> bool:
    """The pool is sized by load (not a manual count, not lifted to min_instances)."""
    return not policy.manual_instances and metrics.current >= policy.min_instances


def _apply_limit(d: Decision, metrics: PoolMetrics) -> Decision:
    limit = metrics.limit
    if limit is None:
        return d
    desired, reason = limit.apply(d.desired, d.reason)
    figures = {**d.figures, "host_max_instances": float(limit.instances), "desired": float(desired),
               "capped": float(desired < d.desired)}
    return dataclasses.replace(d, desired=desired, reason=reason, figures=figures)


def _window_capacity(memory: Memory, now: float) -> float | None:
    """The capacity per instance measured over the stable window that ends ``now``: the median rate of
    the instances saturated in it (None: none was)."""
    latest = [v for t, v in memory.samples if t == now]
    return statistics.median(latest) if latest else None


def check_scale_up(d: Decision, metrics: PoolMetrics, policy: Policy, now: float) -> Decision:
    """Measures what a scale-up added before the next one, and holds scale-ups after one that added nothing.

    The rule: after a scale-up (decided on a measured capacity), no further scale-up until its
    instances all serve (none starting) and a stable window has passed; then the pool's measured
    capacity (the median rate of its instances saturated over that window, × the instances) must
    exceed its capacity when the scale-up was decided by at least ``MEANINGFUL_GROWTH`` of one
    instance's. If it does not (instances that share cores, memory bandwidth or an accelerator
    divide them instead of adding to them), no scale-up until capacity is measured (over a stable
    window) to grow by that much, or for ``SCALE_UP_COOL_DOWN_S``. A pool that is not saturated at
    the window's end kept up: its scale-up is not held against it. Manual counts and min_instances
    are never held.

    Why wait for the window: capacity per instance is measured (:func:`learn_capacity`), and on a
    host whose cores the new instances share it falls as soon as they serve, so the formula asks
    for more at once; Knative's panic mode follows it to max_instances within seconds. The wait is
    AWS EC2 Auto Scaling's instance warm-up and simple-scaling cool-down (no further scaling
    activity until the last one's instances are in service and a cool-down has passed); judging
    whether the scale-up added capacity, and holding on when it did not, is this policy's own.
    """
    memory, current = d.memory, metrics.current
    su, stall, note = memory.scale_up, memory.stalled, ""
    if stall is not None:
        per = _window_capacity(memory, now)
        if now - stall.since >= SCALE_UP_COOL_DOWN_S:
            stall, note = None, f"scale-ups allowed again: the {SCALE_UP_COOL_DOWN_S:g} s cool-down passed"
        elif per is not None and per * current >= stall.total + MEANINGFUL_GROWTH * stall.per_instance:
            stall, note = None, (f"scale-ups allowed again: capacity measured to grow to {per * current:.1f} tok/s "
                                 f"({current} × {per:.1f}) from {stall.total:.1f}")
    if su is not None and su.completed_at is None and metrics.starting == 0:
        su = None if current <= su.before else dataclasses.replace(su, completed_at=now)  # none started: forget
    if su is not None and su.completed_at is not None and metrics.stable is not None \
            and now >= su.completed_at + metrics.stable.window_s:
        per = _window_capacity(memory, now)
        added = per * current - su.total if per is not None else 0.0
        if per is not None and added < MEANINGFUL_GROWTH * su.per_instance:
            why = (f"the scale-up from {su.before} to {su.to} instance(s) did not add capacity: the pool's "
                   f"measured capacity went from {su.total:.1f} to {per * current:.1f} tok/s ({current} × "
                   f"{per:.1f}), {added:+.1f} tok/s, less than {MEANINGFUL_GROWTH:g} of the {su.per_instance:.1f} "
                   "tok/s one more instance was expected to add")
            stall = Stall(now, per * current, su.per_instance, why)
        elif per is not None:
            note = (f"the scale-up from {su.before} to {su.to} instance(s) added {added:.1f} tok/s of capacity "
                    f"({su.total:.1f} → {per * current:.1f})")
        su = None
    memory = dataclasses.replace(memory, scale_up=su, stalled=stall)
    figures = {**d.figures, "scale_up_stalled": float(stall is not None), "scale_up_held": 0.0}
    reason = d.reason
    if stall is not None:
        left = SCALE_UP_COOL_DOWN_S - (now - stall.since)
        why = (f"{stall.why}; no scale-up until capacity is measured to grow or for {SCALE_UP_COOL_DOWN_S:g} s "
               f"({left:.0f} s left)")
    elif su is not None:
        how = ("its instances are starting" if su.completed_at is None else
               f"its instances have served for {now - su.completed_at:.0f} s of a "
               f"{metrics.stable.window_s if metrics.stable else 0:g} s stable window")
        why = f"measuring what the scale-up from {su.before} to {su.to} instance(s) added ({how})"
    else:
        why = ""
    if why and d.desired > current and _automatic(metrics, policy):
        figures.update(desired=float(current), scale_up_held=1.0)
        return dataclasses.replace(d, desired=current, figures=figures, memory=memory, reason=(
            f"scale-up to {d.desired} held at {current}: {why}. Wanted: {d.reason}"))
    if stall is not None:
        reason = f"{reason}; scale-ups held: {why}"
    elif note:
        reason = f"{reason}; {note}"
    return dataclasses.replace(d, reason=reason, figures=figures, memory=memory)


def _remember_scale_up(d: Decision, metrics: PoolMetrics, policy: Policy, now: float) -> Decision:
    """Keeps a scale-up decided on a measured capacity, to check its effect (the earliest baseline
    while one is still unchecked)."""
    current, cap, su = metrics.current, d.capacity, d.memory.scale_up
    if not (d.desired > current and _automatic(metrics, policy) and cap is not None and cap.measured):
        return d
    if su is None:
        su = ScaleUp(now, current, d.desired, cap.tokens_per_second, cap.tokens_per_second * current)
    else:
        su = dataclasses.replace(su, to=d.desired, completed_at=None)
    return dataclasses.replace(d, memory=dataclasses.replace(d.memory, scale_up=su))


def recommend(metrics: PoolMetrics, policy: Policy, memory: Memory, now: float) -> Decision:
    """Knative's / the HPA's recommendation with its tolerance, panic mode, windows and bounds."""
    p, current = policy, metrics.current
    memory = learn_capacity(memory, metrics.instances, now)
    cap = capacity(memory, p)
    figures: dict[str, float] = {"current": float(current), "min_instances": float(p.min_instances),
                                 "max_instances": float(p.max_instances)}
    if cap is not None:
        figures.update(capacity_tokens_per_second=cap.tokens_per_second, capacity_measured=float(cap.measured))

    def hold(n: int, reason: str, mem: Memory = memory) -> Decision:
        figures["desired"] = float(n)
        return Decision(n, reason, figures, mem, cap)

    if p.manual_instances:
        return hold(p.manual_instances, f"manual: ScaleTo {p.manual_instances}",
                    dataclasses.replace(memory, recommendations=(), last_panic=None))
    if current < p.min_instances:
        return hold(p.min_instances, f"{current} instance(s) is below min_instances {p.min_instances}")
    if current > p.max_instances:
        return hold(p.max_instances, f"{current} instances is above max_instances {p.max_instances}")
    if metrics.stable is None:
        return hold(current, f"holding at {current}: no load figures from the monitor ({metrics.error or 'none yet'})",
                    dataclasses.replace(memory, recommendations=()))
    if cap is None:
        stable = metrics.stable
        idle = (stable.demand == 0 and stable.in_flight == 0
                and (metrics.panic is None or (metrics.panic.demand == 0 and metrics.panic.in_flight == 0)))
        if idle and current > p.min_instances:
            # No load at all: whatever an instance's capacity, min_instances serve it; the scale-down
            # window applies as it does to any recommendation.
            recs = _trim(memory.recommendations + ((now, p.min_instances),), now, p.scale_down_window_s)
            mem = dataclasses.replace(memory, recommendations=recs)
            held = now - _run_start(recs, lambda r: r < current)
            if held >= p.scale_down_window_s:
                return hold(max(r for t, r in recs if t >= now - p.scale_down_window_s),
                            f"scale down: no load over {stable.window_s:g} s (capacity unknown, and none is "
                            f"needed); below {current} for {held:.0f} s (scale-down window "
                            f"{p.scale_down_window_s:g} s)", mem)
            return hold(current, f"no load over {stable.window_s:g} s calls for {p.min_instances} for {held:.0f} s "
                                 f"of the {p.scale_down_window_s:g} s scale-down window", mem)
        return hold(current, f"holding at {current}: capacity unknown (no instance has been saturated for a whole "
                             "window yet, and the policy sets no capacity_tokens_per_second estimate)",
                    dataclasses.replace(memory, recommendations=()))

    stable = metrics.stable
    load = stable.demand
    per_instance_target = p.target_utilization * cap.tokens_per_second
    utilisation = load / (current * cap.tokens_per_second) if current else math.inf
    raw = math.ceil(load / per_instance_target - 1e-9)
    within = current > 0 and abs(load / (current * per_instance_target) - 1) <= p.tolerance
    rec = bounded(current if within else raw, p)
    short = metrics.panic.demand if metrics.panic is not None else load
    short_window_s = metrics.panic.window_s if metrics.panic is not None else stable.window_s
    panic_now = short > p.panic_threshold * max(current, 1) * cap.tokens_per_second
    last_panic = now if panic_now else memory.last_panic
    in_panic = last_panic is not None and now - last_panic < stable.window_s
    recs = _trim(memory.recommendations + ((now, rec),), now, max(p.scale_up_window_s, p.scale_down_window_s))
    memory = dataclasses.replace(memory, recommendations=recs, last_panic=last_panic if in_panic else None)
    figures.update(load_tokens_per_second=load, served_tokens_per_second=stable.tokens_per_second,
                   short_load_tokens_per_second=short, window_s=stable.window_s, short_window_s=short_window_s,
                   in_flight=float(stable.in_flight), running=float(stable.running),
                   target_utilization=p.target_utilization, utilization=utilisation, recommended=float(rec),
                   panic=float(in_panic))
    figure = (f"load {load:.1f} tok/s over {stable.window_s:g} s ÷ ({p.target_utilization:g} × "
              f"{cap.describe()}) = {load / per_instance_target:.2f}")

    def done(n: int, reason: str) -> Decision:
        figures["desired"] = float(n)
        return Decision(n, reason, figures, memory, cap, in_panic)

    if panic_now:
        n = max(current, bounded(max(rec, math.ceil(short / per_instance_target - 1e-9)), p))
        # What panic asked for is what the windows remember: no scale-down below it right after.
        memory = dataclasses.replace(memory, recommendations=recs[:-1] + ((now, n),))
        return done(n, f"panic: short-window load {short:.1f} tok/s over {short_window_s:g} s is "
                       f"{short / (max(current, 1) * cap.tokens_per_second):.1f}× the {cap.describe()} of "
                       f"{current} instance(s) (> {p.panic_threshold:g}×): scale to {n} at once, scale-down held")
    if rec < current and in_panic:
        return done(current, f"panic mode (until {stable.window_s:g} s after the last overload): "
                             f"scale-down held; {figure}")
    if rec != current:
        # The delay logic, the same both ways: move only after the recommendation has stayed on
        # one side of ``current`` for the whole window, and then only as far as it stayed.
        up = rec > current
        way, side = ("up", "above") if up else ("down", "below")
        window_s = p.scale_up_window_s if up else p.scale_down_window_s
        held = now - _run_start(recs, (lambda r: r > current) if up else (lambda r: r < current))
        if held >= window_s:
            inside = [r for t, r in recs if t >= now - window_s]
            n = min(inside) if up else max(inside)
            return done(n, f"scale {way}: {figure} → {rec}; {side} {current} for {held:.0f} s "
                           f"(scale-{way} window {window_s:g} s)")
        return done(current, f"{figure} calls for {rec} for {held:.0f} s of the {window_s:g} s "
                             f"scale-{way} window")
    if within:
        return done(current, f"{figure}: within the tolerance of ±{p.tolerance:g} of the target, "
                             f"stay at {current}")
    return done(current, f"{figure}: {current} instance(s) is right")
