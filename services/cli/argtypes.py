"""argparse types for the CLI's numeric and address flags: a bad value is a usage error
(exit 2, the flag named), never a traceback from protobuf or gRPC later.

Ranges are those of the wire (int32, uint64) or of what the flag means.
"""

from __future__ import annotations

import argparse
import math
import re

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
#: Longest deadline a flag may ask for: gRPC's own deadline arithmetic fails
#: (DEADLINE_EXCEEDED at once) from about 1e10 s.
MAX_SECONDS = 365 * 24 * 3600.0


def int_in(lo: int, hi: int):
    """An integer in ``[lo, hi]``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(lo: float, hi: float, lo_open: bool = False):
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        below = value <= lo if lo_open else value < lo
        if not math.isfinite(value) or below or value > hi:
            interval = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


#: Seconds to wait (a deadline, a timeout, a grace period): finite, > 0, at most a year.
seconds = float_in(0.0, MAX_SECONDS, lo_open=True)
#: A count that must be at least 1 and fit an int32.
positive_int32 = int_in(1, INT32_MAX)
#: Draft tokens per round: the services' bound (services.common.validation.MAX_GAMMA, which imports the
#: generated stubs and so grpc; a test keeps the two equal).
MAX_GAMMA = 16
gamma = int_in(1, MAX_GAMMA)
#: A non-negative int32 (0 often means "off" or "default").
non_negative_int32 = int_in(0, INT32_MAX)
#: A seed (uint64 on the wire).
seed = int_in(0, UINT64_MAX)
#: A TCP port.
port = int_in(1, 65535)


#: A host: a name or IPv4 address, or an IPv6 address in brackets; the services' rule
#: (services.common.validation's, which imports grpc; a test keeps the two in agreement).
_HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,252})|\[[0-9A-Fa-f:.]{2,45}(?:%[A-Za-z0-9]+)?\]")


def address(text: str) -> str:
    """A gRPC ``HOST:PORT``, the port in ``[1, 65535]``: gRPC itself would take
    99999 and connect to 99999 - 65536."""
    host, sep, digits = text.rpartition(":")
    if ":" in host and not host.startswith("["):
        raise argparse.ArgumentTypeError(f"an IPv6 host goes in brackets, as in [::1]:50051, got {text!r}")
    if not (sep and _HOST.fullmatch(host)):
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 5) or not 1 <= int(digits) <= 65535:
        raise argparse.ArgumentTypeError(f"the port must be an integer in [1, 65535], got {digits!r} in {text!r}")
    return text
