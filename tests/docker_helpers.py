"""What the compose tests need from the machine: a Docker engine (started here when
absent and we are root), the image built offline (`make docker-image`), an OTLP
trace receiver and Debian's Prometheus on the host."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import json
import logging
from collections import defaultdict
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
SOCKET = Path("/var/run/docker.sock")
log = logging.getLogger(__name__)


def sh(*argv: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    run = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and run.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return run


def engine_answers() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


class Engine:
    """The Docker engine: the one running, or a ``dockerd`` started (and later stopped) here."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.log = Path(tempfile.gettempdir()) / f"llmesh-dockerd-{os.getpid()}.log"

    def why_not(self) -> str | None:
        """None when Docker can be had here; otherwise why not (the skip reason)."""
        missing = [t for t in ("docker", "docker-compose") if not shutil.which(t)]
        if missing:
            return (f"{', '.join(missing)} not installed (make test installs docker.io and docker-compose with "
                    "apt-get when run as root)")
        if engine_answers():
            return None
        if os.geteuid() != 0 or not shutil.which("dockerd"):
            return "no Docker engine answers and this user cannot start dockerd (not root, or no dockerd)"
        return None

    def ensure(self, timeout_s: float = 90) -> None:
        if engine_answers():
            return
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not engine_answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not come up:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)  # sleep-ok: bounded wait for another process

    def stop(self) -> None:
        """Stops the dockerd started here (only that one)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


#: Free space under the engine's data root below which the build first removes untagged images and
#: the build cache: an engine kept between runs (CI's) holds every earlier run's leftovers, and a build
#: copies ~1.5 GB of venv into its first image (2026-12-01: CI failed with "no space left on device").
BUILD_MIN_FREE_BYTES = 10 * 2**30


def make_room() -> None:
    """Removes untagged images and the build cache when the engine's disk is short of
    :data:`BUILD_MIN_FREE_BYTES`, and logs how much was free before and after."""
    root = sh("docker", "info", "--format", "{{.DockerRootDir}}", check=False).stdout.strip()
    if not root or not Path(root).exists() or shutil.disk_usage(root).free >= BUILD_MIN_FREE_BYTES:
        return
    before = shutil.disk_usage(root).free
    sh("docker", "image", "prune", "-f", timeout=600, check=False)
    sh("docker", "builder", "prune", "-f", timeout=600, check=False)
    log.warning("docker: %s: %.1f GiB free, %.1f GiB after pruning", root, before / 2**30,
                shutil.disk_usage(root).free / 2**30)


def build_image(tag: str) -> float:
    """``make docker-image IMAGE=tag`` (base image from debootstrap, host wheelhouse, offline build); seconds."""
    make_room()
    began = time.monotonic()
    sh("make", "-s", "docker-image", f"IMAGE={tag}", f"VENV={sys.prefix}", timeout=1800, cwd=REPO)
    return time.monotonic() - began


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver (opentelemetry-proto's TraceService) on the host."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: trace id (hex) -> {service.name: [span names]}
        self.traces: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("0.0.0.0:0")
        self.server.start()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        self.traces[span.trace_id.hex()][service].append(span.name)
        return trace_service_pb2.ExportTraceServiceResponse()

    def covering(self, services: set[str]) -> dict[str, list[str]] | None:
        with self.lock:
            for spans in self.traces.values():
                if services <= set(spans):
                    return {k: list(v) for k, v in spans.items()}
        return None

    def summary(self) -> str:
        """The traces that are more than one span, then how many there are in all."""
        with self.lock:
            many = [dict(spans) for spans in self.traces.values() if sum(map(len, spans.values())) > 1]
            return f"{many[:20]} ({len(self.traces)} traces in all)"

    def stop(self) -> None:
        self.server.stop(0)


class Prometheus:
    """Debian's ``prometheus`` scraping one target every second, its API on a free local port."""

    def __init__(self, target: str, workdir: Path, port: int) -> None:
        config = workdir / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: llmesh-monitor\n"
                          f"    honor_labels: true\n    static_configs:\n      - targets: ['{target}']\n")
        self.url = f"http://127.0.0.1:{port}"
        self.log = workdir / "prometheus.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def query(self, promql: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.load(reply)["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
