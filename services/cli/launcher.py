"""`llmesh up`: the whole suite as five local processes.

Executes the plan of :mod:`services.common.suite` with
:mod:`services.common.processes`: checks the models and ports,
starts every service (`python -m MODULE ...`, its own session, its output in
``HOME/logs/NAME.log``, or ``HOME/logs/PORT/NAME.log`` with another ``--base-port``), waits until each answers SERVING on
``grpc.health.v1``, prints one line per service (name, address, pid), then
supervises. SIGTERM or Ctrl-C sends SIGTERM to every service and waits for
them (SIGKILL after a grace period); `llmesh down` sends that SIGTERM from
another shell, found through ``HOME/run/up-PORT.json``
(:mod:`services.common.runfile`), which lives as long as the services do. If a service dies, its log tail is
printed and, unless it exited with 0 or by SIGTERM (stopped, not failed), it is started again after a
backoff (1, 2, 4, 8, 16 s), up to 5 times in 10 minutes (:class:`~services.common.processes.RestartPolicy`);
past that, or with ``--no-restart`` at once, the rest are stopped (or, with ``--keep-going``, left running).

With ``--tls`` every hop is TLS, mutual between services: the certificates
of `llmesh certs` (made first when absent, in HOME/certs or ``--certs``)
and its admin token, given to every service (``LLMESH_ADMIN_TOKEN`` from
the environment wins over the file's). Plaintext is for loopback: a
non-loopback ``--host`` needs ``--tls`` or ``--insecure``.

Exit status: 0 when stopped on request and every service exited with 0;
1 when a service failed to start, died (even one started again), or did not stop cleanly; 2 for a
usage error (models or ports missing).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from services.cli import argtypes
from services.common.config import LogLevel
from services.common.paths import default_home
from services.common import runfile
from services.common.processes import (LaunchError, ProcessGroup, RestartPolicy, busy_ports, connect_address,
                                      is_serving, supervise, wait_routable)
from services.common.suite import (DEFAULT_BASE_PORT, SERVICES, UpOptions, flag_value, log_dir, model_paths, plan,
                                  ports)
from services.common.tls import TlsFiles, is_loopback


def options_of(args: argparse.Namespace) -> UpOptions:
    home = Path(args.home) if args.home else default_home()
    tls_dir = (Path(args.certs) if args.certs else home / "certs") if args.tls else None
    return UpOptions(home=home, host=args.host,
                     base_port=args.base_port, threads=args.threads, log_level=args.log_level,
                     target_model=Path(args.target_model) if args.target_model else None,
                     draft_model=Path(args.draft_model) if args.draft_model else None,
                     prometheus_port=args.prometheus_port, tls_dir=tls_dir, insecure=args.insecure,
                     tp=args.tp, pp=args.pp)


def with_certs(options: UpOptions) -> tuple[UpOptions, TlsFiles | None]:
    """With ``--tls``: makes what `llmesh certs` would where it is missing, and
    takes its admin token (unless the environment gives one). Returns the
    options and the launcher's own TLS files (the CLI's certificate; None
    without ``--tls``). ValueError/OSError when the files cannot be made."""
    from dataclasses import replace

    from services.cli.certs import files, make_certs, read_admin_token

    if options.tls_dir is None:
        return options, None
    written = make_certs(options.tls_dir)
    if written:
        _say(f"made {len(written)} TLS file(s) in {options.tls_dir} (llmesh certs)")
    token = os.environ.get("LLMESH_ADMIN_TOKEN") or read_admin_token(options.tls_dir)
    return replace(options, admin_token=token), files(options.tls_dir, "cli")


def preflight(options: UpOptions) -> str | None:
    """Why the suite cannot start (models or ports missing, plaintext on a
    non-loopback host), or None."""
    if options.tls_dir is None and not options.insecure and not is_loopback(options.host):
        return (f"--host {options.host} is reachable from other machines: pass --tls (certificates from "
                f"`llmesh certs`) or --insecure to serve plaintext there anyway")
    for role, path in model_paths(options).items():
        if not (path / "config.json").is_file():
            explicit = options.target_model if role == "target" else options.draft_model
            hint = (f"pass --{role}-model a Hugging Face causal LM directory" if explicit
                    else f"run `llmesh models build` (or pass --{role}-model DIR)")
            return f"no {role} model at {path}: {hint}"
    wanted = {port: name for name, port in ports(options.base_port, options.prometheus_port).items()}
    busy = busy_ports(options.host, list(wanted))
    if busy:
        names = ", ".join(f"{p} ({wanted[p]})" for p in busy)
        return f"port(s) already in use on {options.host}: {names}; stop the other suite or pass --base-port"
    return None


def _say(text: str, error: bool = False) -> None:
    print(f"llmesh up: {text}", file=sys.stderr if error else sys.stdout, flush=True)


def run(args: argparse.Namespace) -> int:
    options = options_of(args)
    try:
        specs = plan(options)
    except ValueError as exc:
        _say(str(exc), error=True)
        return 2
    problem = preflight(options)
    if problem:
        _say(problem, error=True)
        return 2
    try:
        options, tls = with_certs(options)
    except (ValueError, OSError) as exc:
        _say(f"cannot make the TLS certificates in {options.tls_dir}: {exc}", error=True)
        return 2
    specs = plan(options)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    group = ProcessGroup(specs, log_dir(options.home, options.base_port))
    _say(f"starting {len(specs)} services; logs in {group.log_dir}")
    healthy = False

    def record(_restarted=None) -> None:
        """What `llmesh down` reads; written again when a service is started again (its pid)."""
        runfile.write(options.home, runfile.UpRecord(
            pid=os.getpid(), host=options.host, base_port=options.base_port,
            services={c.name: c.proc.pid for c in group.children}, logs=str(group.log_dir)))

    try:
        group.start()
        record()
        ready = group.wait_ready(args.timeout, lambda address: is_serving(address, tls), stop=stop,
                                 on_ready=lambda c, waited: print(
            f"  {c.name:<8} {c.spec.address:<22} pid {c.proc.pid:<8} serving after {waited:.1f} s", flush=True))
        if ready:
            router = specs[SERVICES.index("router")]
            wait_routable(connect_address(router), args.timeout, tls,  # the router sees its targets
                          (("authorization", f"Bearer {options.admin_token}"),) if options.admin_token else ())
            how = (f"TLS, mutual between services; clients: llmesh generate --tls (certificates in "
                   f"{options.tls_dir})" if tls else "plaintext")
            http = flag_value(router.args, "--http-port")
            web = f", OpenAI HTTP API at {'https' if tls else 'http'}://{router.host}:{http}/v1" if http not in (None, "0") else ""
            _say(f"ready; router at {router.address}{web}, {how} (Ctrl-C or `llmesh down` stops every service)")
            port = ports(options.base_port, options.prometheus_port)
            _say("Prometheus /metrics: " + ", ".join(
                f"{name} {router.host}:{port[key]}" for name, key in (
                    ("monitor", "prometheus"), ("target", "target-metrics"), ("draft", "draft-metrics"),
                    ("scaler", "scaler-metrics"))))
            healthy = supervise(group, stop, args.keep_going,
                                restart=None if args.no_restart else RestartPolicy(), on_restart=record)
        else:
            healthy = True  # stopped on request before the suite was ready
    except (LaunchError, TimeoutError) as exc:
        _say(str(exc), error=True)
    finally:
        _say("stopping every service")
        codes = group.stop(args.grace_period)
        runfile.remove(options.home, options.base_port, os.getpid())
    # A service that the stop's SIGTERM ended before it had set up its own handler (one still starting) stopped
    # as asked; only a service that failed, or had to be killed, did not stop cleanly.
    unclean = {name: rc for name, rc in codes.items() if rc not in (0, -signal.SIGTERM)}
    if healthy and unclean:
        _say(f"did not stop cleanly (exit codes): {unclean}", error=True)
    _say("stopped")
    return 0 if healthy and not unclean else 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "up", help="run the whole suite as local processes",
        description="Starts router, target, draft, monitor and scaler as local processes, waits until each "
                    "is SERVING, and stops them all on Ctrl-C or SIGTERM.")
    p.add_argument("--home", help="llmesh home holding models/ and logs/ (default: $LLMESH_HOME or ~/.cache/llmesh)")
    p.add_argument("--host", default="127.0.0.1", help="address every service listens on (default: %(default)s)")
    p.add_argument("--base-port", type=argtypes.port, default=DEFAULT_BASE_PORT,
                   help="router port; target +10, draft +20, monitor +30, scaler +40; with a base other than the "
                        "default, the OpenAI HTTP API is at +32 (else 8000) and logs go to HOME/logs/PORT "
                        "(default: %(default)s)")
    p.add_argument("--prometheus-port", type=argtypes.port,
                   help="monitor's Prometheus port (default: 9464, or base + 31 with another base)")
    p.add_argument("--target-model", help="target model directory (default: HOME/models/target)")
    p.add_argument("--draft-model", help="draft model directory (default: HOME/models/draft)")
    p.add_argument("--threads", type=argtypes.non_negative_int32, default=0,
                   help="target's torch threads; the draft gets a quarter (default: every core)")
    p.add_argument("--tensor-parallel-size", "--tp", dest="tp", type=argtypes.positive_int32, default=1,
                   help="the target's tensor-parallel ranks (default: %(default)s)")
    p.add_argument("--pipeline-parallel-size", "--pp", dest="pp", type=argtypes.positive_int32, default=1,
                   help="the target's pipeline stages; it runs tp x pp ranks (default: %(default)s)")
    p.add_argument("--log-level", type=str.lower, choices=[level.value for level in LogLevel], default="info",
                   help="every service's logging level (default: %(default)s)")
    p.add_argument("--timeout", type=argtypes.seconds, default=300.0,
                   help="seconds the suite gets to report SERVING (default: %(default)s)")
    p.add_argument("--grace-period", type=argtypes.seconds, default=20.0,
                   help="seconds between SIGTERM and SIGKILL on stop (default: %(default)s)")
    p.add_argument("--tls", action="store_true",
                   help="TLS on every hop, mutual TLS between services, with the certificates and admin token of "
                        "`llmesh certs` (made if absent)")
    p.add_argument("--certs", help="with --tls: the certificates' directory (default: HOME/certs)")
    p.add_argument("--insecure", action="store_true",
                   help="allow plaintext on a non-loopback --host (refused otherwise)")
    p.add_argument("--keep-going", action="store_true",
                   help="when a service dies for good (given up on, or with --no-restart), report it but keep "
                        "the others running")
    p.add_argument("--no-restart", action="store_true",
                   help="do not start a service that failed again (by default: after 1, 2, 4, 8, 16 s, up to "
                        "5 times in 10 minutes); its death stops the suite (see --keep-going). Either way the "
                        "exit status is 1 when a service died")
    p.set_defaults(func=run)
    return p
