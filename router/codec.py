"""Protobuf ⇄ router types (no I/O)."""

from __future__ import annotations

import dataclasses

from services.common.errors import InvalidArgument
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2, router_pb2, stats_pb2
from services.common.load import Latency, LoadReport, Role, windowed
from services.common.load_codec import ROLE_PB, report_of, report_pb
from services.common.metrics import MetricsSnapshot
from router.admission import Admission
from router.cache import ResponseCache
from services.common.validation import check_address, check_generate_request, check_printable
from router.policy import Snapshot, score
from router.registry import DEFAULT_POOL, Health, Instance, InstanceSpec, ModelIdentity, State

#: The roles an instance may register with, by protobuf value.
ROLE_OF_PB = {ROLE_PB[r]: r for r in (Role.TARGET, Role.DRAFT)}
STATES = {State.ACTIVE: router_pb2.INSTANCE_STATE_ACTIVE, State.DRAINING: router_pb2.INSTANCE_STATE_DRAINING,
          State.EJECTED: router_pb2.INSTANCE_STATE_EJECTED}
HEALTHS = {Health.SERVING: router_pb2.INSTANCE_HEALTH_SERVING,
           Health.NOT_SERVING: router_pb2.INSTANCE_HEALTH_NOT_SERVING,
           Health.UNKNOWN: router_pb2.INSTANCE_HEALTH_UNKNOWN}


# -- requests ---------------------------------------------------------------
#: Refuses what is wrong without a model (the target checks context and
#: vocabulary): the same function the model services call.
validate_request = check_generate_request


#: Priority enum value -> class name, as in ``--pools`` (unspecified is normal).
PRIORITY_CLASS = {gen.PRIORITY_UNSPECIFIED: "normal", gen.PRIORITY_BATCH: "batch", gen.PRIORITY_NORMAL: "normal",
                  gen.PRIORITY_INTERACTIVE: "interactive"}
PRIORITY_OF_CLASS = {"batch": gen.PRIORITY_BATCH, "normal": gen.PRIORITY_NORMAL,
                     "interactive": gen.PRIORITY_INTERACTIVE}


def prompt_units(prompt: gen.Prompt) -> str | tuple[int, ...]:
    """The prompt as text or token ids, for prefix affinity (a conversation: its turns' text)."""
    kind = prompt.WhichOneof("kind")
    if kind == "chat":
        return "".join(f"{m.role}: {m.content}\n" for m in prompt.chat.messages)
    return prompt.text if kind == "text" else tuple(prompt.tokens.ids)


def wants_draft(req: gen.GenerateRequest) -> bool:
    """Should the router pick a draft instance for the request?"""
    return not req.draft_address and not (req.speculation.HasField("enabled") and not req.speculation.enabled)


# -- response cache ---------------------------------------------------------
#: Finish reasons of an answer worth keeping (a whole answer, not an error or a cancellation).
COMPLETE = frozenset({gen.FINISH_REASON_LENGTH, gen.FINISH_REASON_EOS, gen.FINISH_REASON_STOP})


def cache_key(req: gen.GenerateRequest, pool: str) -> bytes | None:
    """The key of a deterministic request (greedy, or sampled with a seed), None
    for any other. Equal keys mean an equal prompt and equal parameters;
    speculation settings count only for sampled requests (greedy output does not
    depend on them), the request id and priority never."""
    s = req.sampling
    if (s.temperature > 0 and not s.HasField("seed")) or req.resume_tokens:
        return None
    keyed = gen.GenerateRequest(prompt=req.prompt, sampling=s, echo_prompt=req.echo_prompt,
                                prompt_logprobs=req.prompt_logprobs)
    if req.HasField("logprobs"):
        keyed.logprobs = req.logprobs
    if s.temperature > 0:
        keyed.speculation.CopyFrom(req.speculation)
    return pool.encode() + b"\0" + keyed.SerializeToString(deterministic=True)


def replay(chunks: tuple[gen.GenerateChunk, ...], request_id: str) -> list[gen.GenerateChunk]:
    """A cached answer's chunks for a new request: its id, ``cached`` set, and no speculation
    figures (nothing was speculated for it; the original's said e.g. "draft unresponsive"). The
    replay's own timing is the caller's to set (:func:`replay_timing`)."""
    out = []
    for stored in chunks:
        chunk = gen.GenerateChunk()
        chunk.CopyFrom(stored)
        chunk.request_id = request_id
        chunk.cached = True
        chunk.ClearField("speculation")
        out.append(chunk)
    return out


def replay_timing(first_s: float | None, elapsed_s: float, tokens: int) -> gen.Timing:
    """The timing of a cached answer as this request got it: no queue, its first token
    ``first_s`` and its last ``elapsed_s`` seconds after it arrived. Pure."""
    ttft = (first_s if first_s is not None else elapsed_s) * 1000
    tpot = (elapsed_s * 1000 - ttft) / (tokens - 1) if tokens > 1 else 0.0
    return gen.Timing(queue_ms=0.0, ttft_ms=ttft, tpot_ms=max(0.0, tpot), elapsed_ms=elapsed_s * 1000)


class CompletionBuilder:
    """Folds a stream of chunks into one CompleteResponse (Router.Complete)."""

    def __init__(self) -> None:
        self.response = router_pb2.CompleteResponse()
        self._text: list[str] = []

    def add(self, chunk: gen.GenerateChunk) -> None:
        r = self.response
        r.request_id = chunk.request_id
        r.token_ids.extend(chunk.token_ids)
        r.logprobs.extend(chunk.logprobs)
        r.prompt_logprobs.extend(chunk.prompt_logprobs)
        self._text.append(chunk.text)
        r.instance_id = chunk.instance_id
        r.cached = chunk.cached
        if chunk.HasField("usage"):
            r.usage.CopyFrom(chunk.usage)
        if chunk.HasField("timing"):
            r.timing.CopyFrom(chunk.timing)
        if chunk.HasField("speculation"):
            r.speculation.CopyFrom(chunk.speculation)
        if chunk.finish_reason:
            r.finish_reason = chunk.finish_reason

    def result(self) -> router_pb2.CompleteResponse:
        self.response.text = "".join(self._text)
        return self.response


# -- instances --------------------------------------------------------------
#: Longest instance id, pool name, label key or label value; most labels.
MAX_NAME_CHARS = 256
MAX_LABELS = 64


def spec_of(pb: router_pb2.InstanceSpec) -> InstanceSpec:
    """An instance spec as sent, checked: address host:port, role target or
    draft, names and labels of bounded size (InvalidArgument naming the field)."""
    check_address("instance.address", pb.address)
    for name, value in (("instance.id", pb.id), ("instance.pool", pb.pool)):
        if len(value) > MAX_NAME_CHARS:
            raise InvalidArgument(name, f"must be at most {MAX_NAME_CHARS} characters, got {len(value)}")
        if value != value.strip():
            raise InvalidArgument(name, f"must not start or end with spaces, got {value[:40]!r}")
        check_printable(name, value)
    if len(pb.labels) > MAX_LABELS or any(len(k) > MAX_NAME_CHARS or len(v) > MAX_NAME_CHARS
                                          for k, v in pb.labels.items()):
        raise InvalidArgument("instance.labels", f"at most {MAX_LABELS} labels of at most {MAX_NAME_CHARS} "
                                                 "characters each")
    for key, value in pb.labels.items():
        check_printable("instance.labels", key)
        check_printable(f"instance.labels[{key!r}]", value)
    if pb.role not in ROLE_OF_PB:
        given = stats_pb2.Role.Name(pb.role) if pb.role in stats_pb2.Role.values() else pb.role
        raise InvalidArgument("instance.role", f"must be ROLE_TARGET or ROLE_DRAFT, got {given}")
    return InstanceSpec(id=pb.id or pb.address, address=pb.address, role=ROLE_OF_PB[pb.role],
                        pool=pb.pool or DEFAULT_POOL, labels=tuple(sorted(pb.labels.items())))


def identity_of(info: model_pb2.ModelInfo) -> ModelIdentity:
    """What an instance's GetInfo says it is (a role outside the enum: unspecified)."""
    role = next((r for r, pb in ROLE_PB.items() if pb == info.role), Role.UNSPECIFIED)
    return ModelIdentity(role=role, model_name=info.model_name, tokenizer_hash=info.tokenizer_hash,
                         max_context=info.max_context)


def spec_pb(spec: InstanceSpec) -> router_pb2.InstanceSpec:
    return router_pb2.InstanceSpec(id=spec.id, address=spec.address, role=ROLE_PB[spec.role], pool=spec.pool,
                                   labels=dict(spec.labels))


def role_filter(role: int) -> Role | None:
    if role == stats_pb2.ROLE_UNSPECIFIED:
        return None
    if role not in ROLE_OF_PB:
        raise InvalidArgument("role", "must be ROLE_TARGET, ROLE_DRAFT or ROLE_UNSPECIFIED")
    return ROLE_OF_PB[role]


def status_pb(inst: Instance, snapshot: Snapshot) -> router_pb2.InstanceStatus:
    status = router_pb2.InstanceStatus(
        spec=spec_pb(inst.spec), state=STATES[inst.state],
        health=HEALTHS[inst.effective_health(snapshot.now, snapshot.stale_after_s)],
        score=score(inst, snapshot), in_flight=inst.in_flight, consecutive_failures=inst.consecutive_failures)
    if not inst.routable(snapshot.now, snapshot.stale_after_s):
        status.problem = inst.describe(snapshot.now, snapshot.stale_after_s).removeprefix(inst.id).strip()
    if inst.load is not None:
        status.load.CopyFrom(report_pb(dataclasses.replace(inst.load, instance_id=inst.id, role=inst.spec.role)))
        status.load_age_s = inst.load_age(snapshot.now) or 0.0
    return status


def router_stats_pb(cache: ResponseCache | None, admission: Admission, in_flight: int, rejected_total: int,
                    pools: list[str], priority_pools: dict[str, tuple[str, ...]]) -> router_pb2.RouterStats:
    stats = router_pb2.RouterStats(in_flight=in_flight, rejected_total=rejected_total)
    if cache is not None:
        stats.cache_hits, stats.cache_misses, stats.cache_evictions = cache.hits, cache.misses, cache.evictions
        stats.cache_entries, stats.cache_capacity = len(cache), cache.capacity
    for pool in pools:
        stats.pools.add(pool=pool, in_flight=admission.in_flight.get(pool, 0), max_in_flight=admission.bound(pool),
                        rejected_total=admission.rejected.get(pool, 0),
                        priorities=[PRIORITY_OF_CLASS[c] for c, ps in priority_pools.items() if ps[0] == pool])
    for cls, route in priority_pools.items():
        stats.routes.add(priority=PRIORITY_OF_CLASS[cls], pools=route)
    return stats


# -- load reports -----------------------------------------------------------
def load_of(r: stats_pb2.LoadReport) -> LoadReport:
    """An instance's report as the registry keeps it (every field; see services.common.load_codec)."""
    return report_of(r)


def router_report(m: MetricsSnapshot, in_flight: int, instance_id: str, timestamp: float) -> stats_pb2.LoadReport:
    """The router's own load report: what it forwarded over the window. It queues and
    computes nothing itself, so queue time and token efficiency stay unset."""
    return report_pb(windowed(m, instance_id=instance_id, role=Role.ROUTER, timestamp=timestamp, running=in_flight,
                              in_flight=in_flight, queue_time=Latency(), token_efficiency=0.0))
