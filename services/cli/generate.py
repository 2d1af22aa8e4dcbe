"""`llmesh generate PROMPT`: one generation through the router, streamed.

Text goes to stdout as it arrives (flushed per chunk); a one-line summary
(tokens, time to first token, tokens/s, finish reason) goes to stderr. A
failed call prints its gRPC status code and details and exits 1; a --router
that is another service says so (and what it serves) instead of UNIMPLEMENTED.
"""

from __future__ import annotations

import argparse
import sys
import time

from services.cli import argtypes
from services.cli.certs import add_client_tls_arguments, client_tls
from services.cli.peer import wrong_service
from services.common.suite import DEFAULT_ADDRESSES
from services.speculative.fallback import NO_DRAFT_REASON

PRIORITIES = ("interactive", "normal", "batch")


def build_request(args: argparse.Namespace):
    """The GenerateRequest the flags describe (unset flags stay unset)."""
    from services.common.stubs import generation_pb2 as gen

    sampling = gen.SamplingParams(temperature=args.temperature, max_new_tokens=args.max_tokens,
                                  stop=args.stop or [], ignore_eos=args.ignore_eos)
    for name in ("top_p", "top_k", "seed"):
        if getattr(args, name) is not None:
            setattr(sampling, name, getattr(args, name))
    speculation = gen.SpeculationParams()
    if args.speculate is not None:
        speculation.enabled = args.speculate
    if args.gamma is not None:
        speculation.gamma = args.gamma
    if args.speculative_method is not None:
        speculation.method = gen.SpeculationMethod.Value(f"SPECULATION_METHOD_{args.speculative_method.upper()}")
    return gen.GenerateRequest(prompt=gen.Prompt(text=args.prompt), sampling=sampling,
                               priority=gen.Priority.Value(f"PRIORITY_{args.priority.upper()}"),
                               speculation=speculation)


def _why_none(s) -> str:
    """Why a request that asked for speculation had no token proposed (its final ``SpeculationStats``)."""
    if s.disabled_reason:
        return s.disabled_reason
    if s.draft_timeouts:
        return f"{s.draft_timeouts} rounds passed their deadline"
    if s.not_speculated_reason:
        return f"{s.steps_not_speculated} steps did not speculate: {s.not_speculated_reason}"
    if s.rounds_dropped_by_batch_size:
        return f"{s.rounds_dropped_by_batch_size} rounds dropped when the batch stopped speculating"
    return "the target judged speculation would not pay at its load: its cost model, or --speculative-disable-by-batch-size"


def summary(tokens: int, ttft_s: float | None, elapsed_s: float, last) -> str:
    """One line about a finished stream; tokens/s is over the whole request."""
    from services.common.stubs import generation_pb2 as gen

    parts = [f"{tokens} tokens",
             f"TTFT {ttft_s * 1000:.0f} ms" if ttft_s is not None else "TTFT -",
             f"{tokens / elapsed_s:.1f} tokens/s" if elapsed_s > 0 else "- tokens/s",
             "finish " + (gen.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
                          if last is not None else "none")]
    if last is not None and last.instance_id:
        parts.append(f"instance {last.instance_id}")
    if last is not None and last.HasField("speculation"):
        s = last.speculation
        counts = f"accepted {s.accepted_tokens}/{s.proposed_tokens} proposed tokens"
        if not s.proposed_tokens and not s.fallback_reason:  # asked for, never proposed: say why
            method = gen.SpeculationMethod.Name(s.method).removeprefix("SPECULATION_METHOD_").lower()
            part = f"speculation {method}: no tokens proposed ({_why_none(s)})"
        elif s.fallback_reason == NO_DRAFT_REASON:
            part = f"speculation ngram: {counts} ({s.fallback_reason})"
        elif s.fallback_reason:  # the counts cover the draft model's rounds and then ngram's
            part = f"speculation draft_model, then ngram: {counts} (fell back: {s.fallback_reason})"
        else:
            method = gen.SpeculationMethod.Name(s.method).removeprefix("SPECULATION_METHOD_").lower()
            part = f"speculation {method}: {counts}"
        parts.append(part)
    if last is not None and last.cached:
        parts.append("cached")
    return " · ".join(parts)


def run(args: argparse.Namespace) -> int:
    import grpc

    from services.common.stubs import router_pb2_grpc
    from services.common.tls import Channels

    try:
        tls = client_tls(args)
    except ValueError as exc:
        print(f"llmesh generate: {exc}", file=sys.stderr)
        return 2
    request = build_request(args)
    tokens, first_at, last, ends_with_newline = 0, None, None, True
    started = time.monotonic()
    with Channels(tls).open_sync(args.router) as channel:
        try:
            for chunk in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=args.timeout):
                if chunk.token_ids and first_at is None:
                    first_at = time.monotonic()
                tokens += len(chunk.token_ids)
                if chunk.text:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                    ends_with_newline = chunk.text.endswith("\n")
                last = chunk
        except grpc.RpcError as exc:
            if not ends_with_newline:
                print(flush=True)
            hint = ""
            if exc.code() == grpc.StatusCode.UNAVAILABLE and tls is None and tokens == 0:
                hint = " (if the suite serves TLS, as `llmesh up --tls` does, pass --tls or --tls-ca)"
            wrong = (wrong_service(channel, args.router, "router")
                     if exc.code() == grpc.StatusCode.UNIMPLEMENTED and tokens == 0 else None)
            print(f"llmesh generate: {wrong or f'{exc.code().name}: {exc.details()}{hint}'}", file=sys.stderr)
            return 1
    if not ends_with_newline:
        print(flush=True)
    ttft = first_at - started if first_at is not None else None
    print(summary(tokens, ttft, time.monotonic() - started, last), file=sys.stderr)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text through the router",
                              description="Streams a generation through the router: text to stdout, a "
                                          "summary (tokens, TTFT, tokens/s, finish reason) to stderr.")
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--router", type=argtypes.address, metavar="HOST:PORT", default=DEFAULT_ADDRESSES["router"],
                   help="router address (default: %(default)s)")
    p.add_argument("--max-tokens", type=argtypes.positive_int32, default=64, help="most tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=argtypes.float_in(0.0, 1e30), default=0.0, help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-p", type=argtypes.float_in(0.0, 1.0, lo_open=True), help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top-k", type=argtypes.non_negative_int32, help="keep the k most likely tokens")
    p.add_argument("--seed", type=argtypes.seed, help="sampling seed (same seed, same output)")
    p.add_argument("--stop", nargs="+", action="extend", metavar="S", help="stop sequence(s); repeatable")
    p.add_argument("--ignore-eos", action="store_true", help="generate past end-of-sequence tokens")
    p.add_argument("--priority", choices=PRIORITIES, default="normal", help="scheduling class (default: %(default)s)")
    p.add_argument("--speculate", action=argparse.BooleanOptionalAction, default=None,
                   help="speculative decoding (default: the target's setting); with no --speculative-method, the "
                        "target's method: the draft model, falling back to n-gram lookup where it does not pay")
    p.add_argument("--speculative-method", choices=("draft_model", "ngram"), default=None,
                   help="speculate, proposing with this method only, no fallback (default: the target's); "
                        "implies --speculate unless --no-speculate")
    p.add_argument("--gamma", type=argtypes.gamma,
                   help="speculate with this many draft tokens per round, 1-16 (default: adaptive); implies "
                        "--speculate unless --no-speculate")
    p.add_argument("--timeout", type=argtypes.seconds, default=300.0, help="deadline in seconds (default: %(default)s)")
    add_client_tls_arguments(p)
    p.set_defaults(func=run)
    return p
