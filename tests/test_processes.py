"""services.common.processes: what `llmesh up`, the scaler and the benchmarks use to run services."""

from __future__ import annotations

import socket

from services.common.processes import busy_ports


def _listener(reuse_port: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as gRPC servers do
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_a_listening_server_is_busy_even_with_so_reuseport():
    with _listener(reuse_port=True) as server:
        port = server.getsockname()[1]
        assert busy_ports("127.0.0.1", [port]) == [port]


def test_a_port_whose_server_stopped_is_free_despite_time_wait():
    """A suite that just stopped leaves its server-closed connections in
    TIME_WAIT for a minute; `llmesh up` must not call the port busy."""
    server = _listener(reuse_port=True)
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end goes to TIME_WAIT
    client.recv(1)    # sees EOF
    client.close()
    server.close()
    assert busy_ports("127.0.0.1", [port]) == []


def test_a_restart_keeps_the_previous_log(tmp_path):
    import sys

    from services.common.processes import ProcessGroup
    from services.common.suite import ServiceSpec

    def run_once(year: str) -> None:
        spec = ServiceSpec("echo", "calendar", 0, (year,))  # `python -m calendar YEAR` prints YEAR's calendar
        group = ProcessGroup([spec], tmp_path, python=sys.executable)
        group.start()
        group.children[0].proc.wait(30)

    run_once("2001")
    run_once("2002")
    assert "2002" in (tmp_path / "echo.log").read_text()
    assert "2001" in (tmp_path / "echo.log.1").read_text()
