"""The fleet as the router sees it: instances, their health and their load (pure).

The registry is plain data plus the transitions the router's loops apply to
it (a health change, a load report, a failed request). It knows no gRPC; the
watchers and the forwarder translate what they see on the wire into these
calls. Times are ``time.monotonic()`` seconds passed in by the caller.

An instance is routable only when it is ACTIVE, its health is SERVING with
a fresh load report, and it has answered ``GetInfo`` as the role it was
registered with (:class:`Identity`; a draft's tokenizer must also match
its pool's targets). Its identity is forgotten whenever its health leaves
SERVING, so a restarted or replaced server is asked again.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

from services.common.errors import InvalidArgument, NotFound
from services.common.load import DEFAULT_POOL, LoadReport, Role


#: Cut-off calls in a row that count as one failure toward ejection (Registry.record_cut_off).
CUT_OFFS_PER_FAILURE = 2


class State(enum.Enum):
    """Lifecycle in the registry."""

    ACTIVE = "active"        # receives requests when healthy
    DRAINING = "draining"    # finishes running requests, receives no new ones
    EJECTED = "ejected"      # failed repeatedly; out of rotation for a while


class Health(enum.Enum):
    """Health as last seen through ``grpc.health.v1``."""

    SERVING = "serving"
    NOT_SERVING = "not_serving"
    UNKNOWN = "unknown"


class Identity(enum.Enum):
    """Whether the instance is the kind of server it was registered as."""

    UNCHECKED = "unchecked"    # not asked yet (or being asked)
    CONFIRMED = "confirmed"    # answered GetInfo as its role
    WRONG = "wrong"            # answered as something else, or is no model service at all


@dataclass(frozen=True)
class ModelIdentity:
    """What an instance said of itself in ``GetInfo``."""

    role: Role
    model_name: str = ""
    #: SHA-256 of its tokenizer's vocabulary ("" when it does not say).
    tokenizer_hash: str = ""
    #: Most tokens (prompt + output) a sequence may hold (0 when it does not say).
    max_context: int = 0


@dataclass(frozen=True)
class InstanceSpec:
    """What RegisterInstance says about an instance."""

    id: str
    address: str
    role: Role = Role.TARGET
    pool: str = DEFAULT_POOL
    labels: tuple[tuple[str, str], ...] = ()


@dataclass
class Instance:
    spec: InstanceSpec
    state: State = State.ACTIVE
    health: Health = Health.UNKNOWN
    #: Why the instance is not SERVING, in a few words ("unreachable: connection refused").
    problem: str = ""
    #: The latest load report (its ``timestamp`` is the sender's wall clock; staleness uses ``load_at``).
    load: LoadReport | None = None
    #: When ``load`` arrived (monotonic).
    load_at: float | None = None
    #: Requests this router has in flight on the instance.
    in_flight: int = 0
    consecutive_failures: int = 0
    #: Calls cut off (CANCELLED by the instance) since its last success: not failures one by one (a server
    #: that stops cuts its calls off, a burst past grpc's pending-call limit too), but a run of them is.
    consecutive_cut_offs: int = 0
    #: EJECTED until this time (monotonic).
    ejected_until: float = 0.0
    #: Consecutive failures that ejected it (a request that started before and
    #: succeeds during the ejection resets ``consecutive_failures``, not this), and what they were.
    ejected_after: int = 0
    ejected_by: str = "consecutive failures"
    identity: Identity = Identity.UNCHECKED
    #: What it answered to GetInfo (None before it did, or when it could not).
    info: ModelIdentity | None = None
    #: Why its identity is WRONG, in a few words.
    identity_problem: str = ""
    #: Why it was ejected while its health says SERVING (a draft that stopped answering), else "".
    stalled: str = ""
    #: ``steps_total`` of its first load report after the stall; any later report beyond it readmits it.
    stall_steps: int | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def address(self) -> str:
        return self.spec.address

    def load_age(self, now: float) -> float | None:
        return None if self.load_at is None else max(0.0, now - self.load_at)

    def fresh_load(self, now: float, stale_after_s: float) -> LoadReport | None:
        """The latest load report, or None when there is none or it is stale."""
        age = self.load_age(now)
        return self.load if age is not None and age <= stale_after_s else None

    def effective_health(self, now: float, stale_after_s: float) -> Health:
        """SERVING only with a fresh load report and a confirmed identity: a
        silent or unchecked instance counts as unknown, one of the wrong kind
        as not serving."""
        if self.health is not Health.SERVING:
            return self.health
        if self.identity is Identity.WRONG:
            return Health.NOT_SERVING
        if self.identity is Identity.UNCHECKED or self.fresh_load(now, stale_after_s) is None:
            return Health.UNKNOWN
        return Health.SERVING

    def routable(self, now: float, stale_after_s: float) -> bool:
        """May receive a new request: active, serving, reporting and confirmed as its role."""
        return self.state is State.ACTIVE and self.effective_health(now, stale_after_s) is Health.SERVING

    def describe(self, now: float, stale_after_s: float) -> str:
        """Why the instance is (not) routable, for error messages."""
        if self.state is State.DRAINING:
            return f"{self.id} draining"
        if self.state is State.EJECTED:
            if self.stalled:
                return f"{self.id} ejected: {self.stalled}"
            return f"{self.id} ejected after {self.ejected_after} {self.ejected_by}"
        if self.health is Health.NOT_SERVING:
            return f"{self.id} {self.problem or 'NOT_SERVING'}"
        if self.health is Health.UNKNOWN:
            return f"{self.id} health unknown ({self.problem or 'no answer yet'})"
        if self.identity is Identity.WRONG:
            return f"{self.id} not a {self.spec.role.value}: {self.identity_problem}"
        if self.identity is Identity.UNCHECKED:
            return (f"{self.id} not yet confirmed as a {self.spec.role.value} "
                    f"({self.identity_problem or 'GetInfo not answered yet'})")
        age = self.load_age(now)
        if age is None:
            return f"{self.id} no load report yet"
        if age > stale_after_s:
            return f"{self.id} load report stale ({age:.1f} s old)"
        return f"{self.id} SERVING"


class Registry:
    """Instances by id. Every mutation is one method; none does I/O."""

    def __init__(self, eject_after_failures: int = 0, eject_for_s: float = 0.0) -> None:
        self._instances: dict[str, Instance] = {}
        self.eject_after_failures = eject_after_failures
        self.eject_for_s = eject_for_s

    def __contains__(self, instance_id: str) -> bool:
        return instance_id in self._instances

    def __iter__(self) -> Iterator[Instance]:
        return iter(list(self._instances.values()))

    def __len__(self) -> int:
        return len(self._instances)

    def get(self, instance_id: str) -> Instance:
        try:
            return self._instances[instance_id]
        except KeyError:
            raise NotFound(f"no instance with id {instance_id!r}") from None

    def find(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def upsert(self, spec: InstanceSpec) -> tuple[Instance, Instance | None]:
        """Adds an instance or updates the one with the same id (which becomes
        ACTIVE again). Returns it and, when the address changed, the replaced
        instance (its connections must go)."""
        if not spec.id:
            raise InvalidArgument("instance.id", "must not be empty")
        old = self._instances.get(spec.id)
        if old is not None and old.address == spec.address:
            if old.spec.role is not spec.role or old.spec.pool != spec.pool:
                self._forget_identity(old)  # asked again, as what it is registered as now
            old.spec = spec
            old.state = State.ACTIVE
            old.consecutive_failures = 0
            old.stalled, old.stall_steps = "", None
            self._judge_drafts(old)
            return old, None
        inst = Instance(spec)
        self._instances[spec.id] = inst
        if old is not None:
            self._judge_drafts(old)
        return inst, old

    def remove(self, instance_id: str) -> Instance:
        inst = self.get(instance_id)
        del self._instances[instance_id]
        self._judge_drafts(inst)
        return inst

    def drain(self, instance_id: str) -> Instance:
        inst = self.get(instance_id)
        inst.state = State.DRAINING
        return inst

    def select(self, role: Role | None = None, pool: str | None = None) -> list[Instance]:
        """Instances of a role and pool (None: any), ordered by id."""
        return sorted((i for i in self._instances.values()
                       if (role is None or i.spec.role is role) and (pool is None or i.spec.pool == pool)),
                      key=lambda i: i.id)

    # -- what the loops observe -------------------------------------------
    def set_health(self, instance_id: str, health: Health, problem: str = "") -> None:
        inst = self._instances.get(instance_id)
        if inst is None:
            return
        inst.health = health
        inst.problem = "" if health is Health.SERVING else (problem or health.name)
        if health is not Health.SERVING:
            self._forget_identity(inst)

    def record_load(self, instance_id: str, load: LoadReport, now: float) -> None:
        """A load report arrived. A stalled instance whose engine has stepped
        since its first report after the stall is back (ACTIVE)."""
        inst = self._instances.get(instance_id)
        if inst is None:
            return
        inst.load, inst.load_at = load, now
        if inst.stalled:
            if inst.stall_steps is None:
                inst.stall_steps = load.steps_total
            elif load.steps_total > inst.stall_steps:
                inst.stalled, inst.stall_steps = "", None
                inst.consecutive_failures = 0
                if inst.state is State.EJECTED:
                    inst.state = State.ACTIVE

    # -- identity -----------------------------------------------------------
    def set_identity(self, instance_id: str, info: ModelIdentity) -> Instance | None:
        """What the instance answered to GetInfo: CONFIRMED when it is its
        registered role (a draft's tokenizer matching its pool's targets),
        WRONG otherwise. A target's answer has its pool's drafts judged again."""
        inst = self._instances.get(instance_id)
        if inst is None:
            return None
        inst.info = info
        self._judge(inst)
        self._judge_drafts(inst)
        return inst

    def set_wrong_kind(self, instance_id: str, problem: str) -> None:
        """The instance is no model service of its role (GetInfo or Generate answered UNIMPLEMENTED...)."""
        inst = self._instances.get(instance_id)
        if inst is None:
            return
        inst.info, inst.identity, inst.identity_problem = None, Identity.WRONG, problem
        self._judge_drafts(inst)

    def set_identity_problem(self, instance_id: str, problem: str) -> None:
        """Why the instance's identity is not confirmed yet (GetInfo failed; asked again)."""
        inst = self._instances.get(instance_id)
        if inst is not None and inst.identity is Identity.UNCHECKED:
            inst.identity_problem = problem

    def forget_identity(self, instance_id: str) -> None:
        """Ask the instance again before routing to it (it answered as another kind of server)."""
        inst = self._instances.get(instance_id)
        if inst is not None:
            self._forget_identity(inst)

    def _forget_identity(self, inst: Instance) -> None:
        was = inst.identity
        inst.info, inst.identity, inst.identity_problem = None, Identity.UNCHECKED, ""
        if was is not Identity.UNCHECKED:
            self._judge_drafts(inst)

    def _judge(self, inst: Instance) -> None:
        info = inst.info
        if info is None:
            return
        role = inst.spec.role
        if info.role is not role:
            inst.identity = Identity.WRONG
            inst.identity_problem = f"answers GetInfo as a {info.role.value}"
            return
        if role is Role.DRAFT:
            hashes = self.tokenizers(inst.spec.pool)
            if hashes and info.tokenizer_hash not in hashes:
                inst.identity = Identity.WRONG
                inst.identity_problem = (f"its tokenizer ({info.tokenizer_hash[:12] or 'not reported'}) is not "
                                         f"its pool's targets' ({', '.join(sorted(h[:12] for h in hashes))})")
                return
        inst.identity, inst.identity_problem = Identity.CONFIRMED, ""

    def _judge_drafts(self, changed: Instance) -> None:
        """A target's identity changed: its pool's drafts are judged again."""
        if changed.spec.role is not Role.TARGET:
            return
        for inst in self.select(Role.DRAFT, changed.spec.pool):
            self._judge(inst)

    def tokenizers(self, pool: str) -> set[str]:
        """Tokenizer hashes the confirmed targets of ``pool`` report (empty: none reports one)."""
        return {i.info.tokenizer_hash for i in self.select(Role.TARGET, pool)
                if i.identity is Identity.CONFIRMED and i.info is not None and i.info.tokenizer_hash}

    def started(self, instance_id: str) -> None:
        inst = self._instances.get(instance_id)
        if inst is not None:
            inst.in_flight += 1

    def finished(self, instance_id: str) -> None:
        inst = self._instances.get(instance_id)
        if inst is not None:
            inst.in_flight = max(0, inst.in_flight - 1)

    def record_success(self, instance_id: str) -> None:
        inst = self._instances.get(instance_id)
        if inst is not None:
            inst.consecutive_failures = 0
            inst.consecutive_cut_offs = 0

    def record_cut_off(self, instance_id: str, now: float) -> None:
        """A call to the instance was cut off (CANCELLED) while its health may
        still say SERVING. One is retried elsewhere and not counted; a run of
        :data:`CUT_OFFS_PER_FAILURE` times ``eject_after_failures`` with no
        success between is a failing instance, and ejects it as failures do."""
        inst = self._instances.get(instance_id)
        if inst is None:
            return
        inst.consecutive_cut_offs += 1
        if (self.eject_after_failures and inst.state is State.ACTIVE
                and inst.consecutive_cut_offs >= CUT_OFFS_PER_FAILURE * self.eject_after_failures):
            inst.state = State.EJECTED
            inst.ejected_until = now + self.eject_for_s
            inst.ejected_after = inst.consecutive_cut_offs
            inst.ejected_by = "calls cut off (CANCELLED) in a row"

    def record_failure(self, instance_id: str, now: float, unreachable: str | None = None) -> None:
        """A request failed on the instance. ``unreachable`` (the reason) marks
        it NOT_SERVING at once: its health watcher restores it on reconnect."""
        inst = self._instances.get(instance_id)
        if inst is None:
            return
        inst.consecutive_failures += 1
        if unreachable is not None:
            self.set_health(instance_id, Health.NOT_SERVING, f"unreachable ({unreachable})")
        if (self.eject_after_failures and inst.consecutive_failures >= self.eject_after_failures
                and inst.state is State.ACTIVE):
            inst.state = State.EJECTED
            inst.ejected_until = now + self.eject_for_s
            inst.ejected_after, inst.ejected_by = inst.consecutive_failures, "consecutive failures"

    def record_stall(self, instance_id: str, now: float, reason: str) -> None:
        """The instance stopped answering while its health says SERVING (a draft
        whose rounds time out on a target: ``reason``). Counted as a failure,
        and ejected at once (unless ejection is off): back when a load report
        shows its engine stepping again, or, half-open, after ``eject_for_s``."""
        inst = self._instances.get(instance_id)
        if inst is None:
            return
        inst.consecutive_failures += 1
        if not self.eject_after_failures:
            return
        inst.stalled, inst.stall_steps = reason, None
        if inst.state is State.ACTIVE:
            inst.state = State.EJECTED
            inst.ejected_until = now + self.eject_for_s

    def readmit(self, now: float) -> list[Instance]:
        """Ejected instances whose time is up become ACTIVE again (half-open:
        the next failure ejects them again, since the failure count stays)."""
        back = [i for i in self._instances.values() if i.state is State.EJECTED and i.ejected_until <= now]
        for inst in back:
            inst.state = State.ACTIVE
            inst.stalled, inst.stall_steps = "", None
        return back
