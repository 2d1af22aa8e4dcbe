"""The plan of a local suite: which processes `llmesh up` starts, with what.

Pure: no processes, no network, no environment reads. :func:`plan` turns the
options of `llmesh up` into one :class:`ServiceSpec` per service; the
launcher only executes it.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: The five services, in start order (model services first: they load longest).
SERVICES = ("draft", "target", "router", "monitor", "scaler")

#: The module each service runs as (`python -m MODULE`); each has `main(argv) -> int`.
MODULES = {
    "router": "router.main",
    "target": "services.target.main",
    "draft": "services.draft.main",
    "monitor": "monitor.main",
    "scaler": "scaler.main",
}

DEFAULT_BASE_PORT = 50051
DEFAULT_PROMETHEUS_PORT = 9464
#: Port of each service relative to the base port (the router's).
PORT_OFFSETS = {"router": 0, "target": 10, "draft": 20, "monitor": 30, "scaler": 40}
#: With a non-default base, the monitor's Prometheus exposition sits next to it.
PROMETHEUS_OFFSET = 31
#: The /metrics port of target, draft and scaler (their llmesh: metrics), relative to the base port.
METRICS_OFFSETS = {"target-metrics": 12, "draft-metrics": 22, "scaler-metrics": 42}
#: The router's OpenAI-compatible HTTP port: 8000 with the default base, else base + 32.
DEFAULT_HTTP_PORT = 8000
HTTP_OFFSET = 32

#: Default addresses of a suite started with the default ports.
DEFAULT_ADDRESSES = {name: f"127.0.0.1:{DEFAULT_BASE_PORT + off}" for name, off in PORT_OFFSETS.items()}


@dataclass(frozen=True)
class UpOptions:
    """What `llmesh up` was asked for. ``threads`` 0 means "every core".

    ``tls_dir``: a `llmesh certs` directory; every service then serves TLS
    with its own certificate (NAME.crt/NAME.key, ca.crt) and calls the others
    with it (None: plaintext). ``admin_token``: given to every service
    (empty: none). ``insecure``: plaintext on a non-loopback ``host``.
    """

    home: Path
    host: str = "127.0.0.1"
    base_port: int = DEFAULT_BASE_PORT
    target_model: Path | None = None
    draft_model: Path | None = None
    threads: int = 0
    log_level: str = "info"
    prometheus_port: int | None = None
    tls_dir: Path | None = None
    admin_token: str = ""
    insecure: bool = False
    tp: int = 1   # the target's tensor-parallel size (ranks per stage)
    pp: int = 1   # the target's pipeline-parallel size (stages)


@dataclass(frozen=True)
class ServiceSpec:
    """One process of the suite.

    ``env`` holds only the variables this process sets on top of the
    launcher's own environment.
    """

    name: str
    module: str
    port: int
    args: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self, python: str) -> list[str]:
        return [python, "-m", self.module, *self.args]


def flag_value(args: Sequence[str], name: str) -> str | None:
    """The value of flag ``name`` (``--threads``) in a service's arguments, as
    ``--threads 2`` or ``--threads=2`` (the last one given, as argparse takes
    it), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def log_dir(home: Path, base_port: int = DEFAULT_BASE_PORT) -> Path:
    """Where `llmesh up` puts its services' logs: ``HOME/logs`` with the default
    ports, ``HOME/logs/PORT`` for a suite on another ``--base-port``, so that two
    suites sharing a HOME never write (or rotate away) each other's files."""
    return home / "logs" if base_port == DEFAULT_BASE_PORT else home / "logs" / str(base_port)


def ports(base_port: int = DEFAULT_BASE_PORT, prometheus_port: int | None = None) -> dict[str, int]:
    """Every service's port, plus ``"prometheus"`` and ``"http"`` (the router's HTTP front door).

    The default base gives the documented ports (router 50051 with HTTP on
    8000, target 50061, draft 50071, monitor 50081 with Prometheus on 9464,
    scaler 50091); any other base offsets all of them from it, Prometheus at
    base + 31, HTTP at base + 32. The target's, draft's and scaler's own
    /metrics (``"target-metrics"``, ...) sit at base + 12, + 22 and + 42
    (50063, 50073, 50093 by default).
    """
    out = {name: base_port + off for name, off in (PORT_OFFSETS | METRICS_OFFSETS).items()}
    if prometheus_port is None:
        prometheus_port = (DEFAULT_PROMETHEUS_PORT if base_port == DEFAULT_BASE_PORT
                           else base_port + PROMETHEUS_OFFSET)
    out["prometheus"] = prometheus_port
    out["http"] = DEFAULT_HTTP_PORT if base_port == DEFAULT_BASE_PORT else base_port + HTTP_OFFSET
    if not all(0 < p <= 65535 for p in out.values()):
        raise ValueError(f"base port {base_port} puts a port out of range: {out}")
    return out


def thread_counts(threads: int, cpus: int) -> dict[str, int]:
    """Intra-op threads per process.

    The target gets ``threads`` (0: every core), the draft a quarter of that
    (at least one): while speculating they mostly take turns, and idle
    threads sleep (``OMP_WAIT_POLICY=PASSIVE``) instead of spinning on the
    cores the other needs. Services that run no model get one.
    """
    target = threads if threads > 0 else max(1, cpus)
    return {"target": target, "draft": max(1, target // 4), "router": 1, "monitor": 1, "scaler": 1}


def _env(home: Path, threads: int) -> dict[str, str]:
    n = str(threads)
    return {"LLMESH_HOME": str(home), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": n,
            "MKL_NUM_THREADS": n, "PYTHONUNBUFFERED": "1"}


def tls_env(name: str, tls_dir: Path) -> dict[str, str]:
    """The variables that give service ``name`` its certificate: the generic
    ones (its tools, such as the healthcheck, read them too) and the
    service's own. The scaler also gets the target's, for the targets it starts
    (they inherit its environment, and LLMESH_TARGET_* wins over LLMESH_*)."""
    env = {"LLMESH_TLS_CA": str(tls_dir / "ca.crt"), "LLMESH_TLS_CERT": str(tls_dir / f"{name}.crt"),
           "LLMESH_TLS_KEY": str(tls_dir / f"{name}.key")}
    for owner in (name, "target") if name == "scaler" else (name,):
        prefix = f"LLMESH_{owner.upper()}_"
        env |= {prefix + "TLS_CA": str(tls_dir / "ca.crt"), prefix + "TLS_CERT": str(tls_dir / f"{owner}.crt"),
                prefix + "TLS_KEY": str(tls_dir / f"{owner}.key")}
    return env


def model_paths(options: UpOptions) -> dict[str, Path]:
    """The target and draft model directories (defaults under HOME/models)."""
    return {"target": options.target_model or options.home / "models" / "target",
            "draft": options.draft_model or options.home / "models" / "draft"}


def plan(options: UpOptions, cpus: int | None = None) -> list[ServiceSpec]:
    """The five processes of a local suite, in :data:`SERVICES` order."""
    cpus = cpus or os.cpu_count() or 1
    port = ports(options.base_port, options.prometheus_port)
    threads = thread_counts(options.threads, cpus)
    ranks = options.tp * options.pp
    threads["target"] = max(1, threads["target"] // ranks)  # per rank: the ranks share the target's cores
    models = model_paths(options)

    # Where the services reach each other: a wildcard bind is reached on loopback
    # (an address certificates name, unlike 0.0.0.0).
    reach = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(options.host, options.host)

    def addr(name: str) -> str:
        return f"[{reach}]:{port[name]}" if ":" in reach else f"{reach}:{port[name]}"

    parallel = (("--tensor-parallel-size", str(options.tp), "--pipeline-parallel-size", str(options.pp))
                if ranks > 1 else ())
    extra = {
        "draft": ("--model", str(models["draft"]), "--threads", str(threads["draft"]),
                  "--metrics-port", str(port["draft-metrics"])),
        "target": ("--model", str(models["target"]), "--threads", str(threads["target"]),
                   "--draft-address", addr("draft"), "--metrics-port", str(port["target-metrics"]), *parallel),
        "router": ("--targets", addr("target"), "--drafts", addr("draft"), "--http-port", str(port["http"])),
        "monitor": ("--router", addr("router"), "--prometheus-port", str(port["prometheus"])),
        "scaler": ("--router", addr("router"), "--monitor", addr("monitor"),
                   "--metrics-port", str(port["scaler-metrics"]),
                   # The targets it starts are the suite's target's like: its model, threads and
                   # draft, a /metrics of their own (a free port, in their log), logs beside the suite's.
                   "--target-model", str(models["target"]),
                   "--target-args", shlex.join(("--threads", str(threads["target"]), "--draft-address",
                                                addr("draft"), "--metrics-port", "0",
                                                "--log-level", options.log_level, *parallel)),
                   "--log-dir", str(log_dir(options.home, options.base_port) / "scaled")),
    }
    def env(name: str) -> dict[str, str]:
        out = _env(options.home, threads[name])
        if options.tls_dir is not None:
            out |= tls_env(name, options.tls_dir)
        if options.admin_token:
            out["LLMESH_ADMIN_TOKEN"] = options.admin_token
        return out

    insecure = ("--insecure", "true") if options.insecure else ()  # a bool field takes a value
    return [ServiceSpec(name=name, module=MODULES[name], port=port[name], host=options.host,
                        args=("--host", options.host, "--port", str(port[name]),
                              "--log-level", options.log_level, *extra[name], *insecure),
                        env=env(name))
            for name in SERVICES]

