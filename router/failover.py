"""What to do when an upstream call fails (pure).

Before the first token nothing reached the client, so the request can go to
another instance as if it had never been sent. After it, the stream resumes
elsewhere: the new instance gets the prompt plus the tokens already streamed
as ``resume_tokens``; they count toward ``max_new_tokens``, and since
sampling is a function of (seed, position) the resumed stream is exactly the
one the first instance would have produced (greedy, or seeded sampling; the
router seeds every sampled request that has no seed for this reason).

Status codes are passed by name so that this module needs no gRPC.
"""

from __future__ import annotations

import enum

#: Failures of the instance rather than of the request: another instance may succeed.
INSTANCE_FAULTS = frozenset({"UNAVAILABLE", "CANCELLED", "UNKNOWN", "INTERNAL", "ABORTED", "DATA_LOSS"})
#: Worth another instance before the first token (a full queue may not be full elsewhere).
RETRYABLE = INSTANCE_FAULTS | {"RESOURCE_EXHAUSTED"}
#: Worth resuming elsewhere after tokens were streamed.
RESUMABLE = INSTANCE_FAULTS

#: The code used when an upstream stream ends without its last chunk.
INCOMPLETE = "UNAVAILABLE"


class Outcome(enum.Enum):
    RETRY = "retry"      # nothing streamed yet: send the request to another instance
    RESUME = "resume"    # tokens streamed: continue on another instance from them
    FAIL = "fail"        # relay the error to the client


def decide(code: str, streamed: int, attempts: int, max_attempts: int, resume: bool = True) -> Outcome:
    """The next step after a failed attempt.

    ``code``: the upstream status code's name; ``streamed``: tokens already
    sent to the client for this request; ``attempts``: instances tried so far.
    """
    if attempts >= max_attempts:
        return Outcome.FAIL
    if streamed == 0:
        return Outcome.RETRY if code in RETRYABLE else Outcome.FAIL
    return Outcome.RESUME if resume and code in RESUMABLE else Outcome.FAIL


def is_instance_fault(code: str) -> bool:
    """Does the failure count against the instance (toward ejection)?"""
    return code in INSTANCE_FAULTS


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
