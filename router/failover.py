"""What to do when an upstream call fails (pure).

Before the first token nothing reached the client, so the request can go to
another instance as if it had never been sent. After it, the stream resumes
elsewhere: the new instance gets the prompt plus the tokens already streamed
as ``resume_tokens``; they count toward ``max_new_tokens``, and since
sampling is a function of (seed, position) the resumed stream is exactly the
one the first instance would have produced (greedy, or seeded sampling; the
router seeds every sampled request that has no seed for this reason), and so
is its text: the new instance replays the streamed tokens through its
detokenizer first (``services.engine.detokenizer``), so a character cut in
two at the break, or text held back for a possible stop sequence, comes out
of the new instance.

Every status code an upstream may return is classified here, once
(:data:`FAULTS`): the request's own fault reaches the client as it came; any
other is the instance's (or the fleet's) business, so it is tried elsewhere
and, when nothing is left, the client gets the router's UNAVAILABLE naming
the last upstream error, never the upstream's code as is.

Status codes are passed by name so that this module needs no gRPC.
"""

from __future__ import annotations

import enum


class Fault(enum.Enum):
    """Whose fault an upstream status is, and what follows from it."""

    #: The request's own: the same request fails on any instance. Passed to the client as it came.
    REQUEST = "request"
    #: The instance is full: another may take the request; not held against the instance.
    BUSY = "busy"
    #: The call was cut off on the instance's side with no word on why (a CANCELLED
    #: the router did not ask for: the server stopped with the call in flight, or
    #: grpc core dropped calls of a burst before the service saw them). Another
    #: instance may take or resume the request; not held against the instance,
    #: whose health watcher is asked to look again (it says whether it still serves).
    CUT_OFF = "cut_off"
    #: The instance failed the request: another may succeed; counts toward its ejection.
    INSTANCE = "instance"
    #: As INSTANCE, and the connection failed: NOT_SERVING until its health watcher says otherwise.
    UNREACHABLE = "unreachable"
    #: As INSTANCE, and the server is not the kind it was registered as (a monitor
    #: registered as a target answers UNIMPLEMENTED): not routable until it answers
    #: GetInfo as its role again.
    WRONG_KIND = "wrong_kind"


#: Every status code but OK, by name. A code missing here counts as the instance's fault.
FAULTS: dict[str, Fault] = {
    # The request's: bad or impossible input, or its deadline passed (it travels with every attempt).
    "INVALID_ARGUMENT": Fault.REQUEST,
    "OUT_OF_RANGE": Fault.REQUEST,
    "NOT_FOUND": Fault.REQUEST,
    "ALREADY_EXISTS": Fault.REQUEST,
    "DEADLINE_EXCEEDED": Fault.REQUEST,
    "RESOURCE_EXHAUSTED": Fault.BUSY,
    # The instance's: its state, its own errors, or its refusal of the router (the
    # router's credentials, not the client's, travel upstream: the client cannot fix it).
    "FAILED_PRECONDITION": Fault.INSTANCE,
    "PERMISSION_DENIED": Fault.INSTANCE,
    "UNAUTHENTICATED": Fault.INSTANCE,
    "ABORTED": Fault.INSTANCE,
    "INTERNAL": Fault.INSTANCE,
    "UNKNOWN": Fault.INSTANCE,
    "DATA_LOSS": Fault.INSTANCE,
    "UNAVAILABLE": Fault.UNREACHABLE,
    "CANCELLED": Fault.CUT_OFF,
    "UNIMPLEMENTED": Fault.WRONG_KIND,
}

#: The code used when an upstream stream ends without its last chunk.
INCOMPLETE = "UNAVAILABLE"


def fault_of(code: str) -> Fault:
    """Whose fault the upstream status ``code`` (a grpc.StatusCode name) is."""
    return FAULTS.get(code, Fault.INSTANCE)


def is_instance_fault(code: str) -> bool:
    """Does the failure count against the instance (toward ejection)?"""
    return fault_of(code) in (Fault.INSTANCE, Fault.UNREACHABLE, Fault.WRONG_KIND)


def relayed_as_is(code: str) -> bool:
    """Does the client get the upstream status as it came (its own fault, or a
    full fleet with its retry-after), rather than the router's UNAVAILABLE?"""
    return fault_of(code) in (Fault.REQUEST, Fault.BUSY)


class Outcome(enum.Enum):
    RETRY = "retry"      # nothing streamed yet: send the request to another instance
    RESUME = "resume"    # tokens streamed: continue on another instance from them
    FAIL = "fail"        # give the client the error


def decide(code: str, streamed: int, attempts: int, max_attempts: int, resume: bool = True) -> Outcome:
    """The next step after a failed attempt.

    ``code``: the upstream status code's name; ``streamed``: tokens already
    sent to the client for this request; ``attempts``: instances tried so far.
    Before the first token everything but the request's own fault is worth
    another instance (a full queue may not be full elsewhere); after it,
    only the instance's faults, and a call cut off, are worth resuming.
    """
    if attempts >= max_attempts or fault_of(code) is Fault.REQUEST:
        return Outcome.FAIL
    if streamed == 0:
        return Outcome.RETRY
    worth_resuming = is_instance_fault(code) or fault_of(code) is Fault.CUT_OFF
    return Outcome.RESUME if resume and worth_resuming else Outcome.FAIL


#: Rounds of one request that missed the target's deadline after which the
#: router takes the draft it chose out of rotation (a draft that is alive but
#: silent). The target gives up on a draft after as many in a row
#: (``services.speculative.speculator.MAX_CONSECUTIVE_TIMEOUTS``), so a draft
#: that stalls shows exactly this many in the request's speculation stats.
DRAFT_STALL_TIMEOUTS = 2


class DraftVerdict(enum.Enum):
    ANSWERED = "answered"  # its rounds were verified: a success of the draft
    STALLED = "stalled"    # its rounds timed out: a failure, and out of rotation until it answers
    UNKNOWN = "unknown"    # no round was asked or none answered for another reason


def draft_verdict(rounds: int, draft_timeouts: int, fell_back: bool = False) -> DraftVerdict:
    """What a finished request's speculation stats (``rounds`` verified,
    ``draft_timeouts`` missed the deadline, ``fell_back``: the request left
    the draft for n-gram lookup, so its verified rounds may be the lookup's)
    say about the draft it used."""
    if draft_timeouts >= DRAFT_STALL_TIMEOUTS:
        return DraftVerdict.STALLED
    if rounds > 0 and not fell_back:
        return DraftVerdict.ANSWERED
    return DraftVerdict.UNKNOWN


def short_reason(details: str, limit: int = 80) -> str:
    """A few words on why a call failed, for registry problems and messages."""
    lowered = details.lower()
    for needle, reason in (("connection refused", "connection refused"),
                           ("failed to connect", "cannot connect"),
                           ("connection reset", "connection reset"),
                           ("socket closed", "connection closed"),
                           ("broken pipe", "connection closed")):
        if needle in lowered:
            return reason
    first = details.strip().splitlines()[0] if details.strip() else "no details"
    return first if len(first) <= limit else first[: limit - 1] + "…"
