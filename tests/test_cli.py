"""The `llmesh` command: the launcher's plan (pure), argument parsing, the
process supervisor on throwaway processes, the gRPC healthcheck against an
in-process health server, and `status` against nothing."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
from concurrent import futures
from pathlib import Path

import grpc
import shlex

import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.cli import launcher, status
from services.common import healthcheck, processes, runfile
from services.cli.generate import build_request
from services.cli.main import build_parser, main
from services.common.suite import MODULES, SERVICES, ServiceSpec, UpOptions, plan, ports, thread_counts
from services.common import lifeline
from services.common.stubs import generation_pb2 as gen
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def arg(spec: ServiceSpec, flag: str) -> str:
    """The value following ``flag`` in a spec's arguments."""
    return spec.args[spec.args.index(flag) + 1]


# -- the plan (pure) ---------------------------------------------------------

def test_default_plan_starts_five_services_on_the_documented_ports():
    specs = {s.name: s for s in plan(UpOptions(home=Path("/h")), cpus=2)}
    assert list(specs) == list(SERVICES) and set(SERVICES) == set(MODULES)
    assert {n: s.port for n, s in specs.items()} == {
        "router": 50051, "target": 50061, "draft": 50071, "monitor": 50081, "scaler": 50091}
    for name, s in specs.items():
        assert s.module == MODULES[name]
        assert s.command("py")[:3] == ["py", "-m", MODULES[name]]
        assert arg(s, "--host") == "127.0.0.1" and arg(s, "--port") == str(s.port)
        assert arg(s, "--log-level") == "info"
        assert s.env["OMP_WAIT_POLICY"] == "PASSIVE" and s.env["LLMESH_HOME"] == "/h"
    assert arg(specs["target"], "--model") == "/h/models/target"
    assert arg(specs["draft"], "--model") == "/h/models/draft"
    assert arg(specs["target"], "--draft-address") == "127.0.0.1:50071"
    assert arg(specs["router"], "--targets") == "127.0.0.1:50061"
    assert arg(specs["router"], "--drafts") == "127.0.0.1:50071"
    assert arg(specs["router"], "--http-port") == "8000"
    assert arg(specs["monitor"], "--router") == "127.0.0.1:50051"
    assert arg(specs["monitor"], "--prometheus-port") == "9464"
    assert arg(specs["scaler"], "--router") == "127.0.0.1:50051"
    assert arg(specs["scaler"], "--monitor") == "127.0.0.1:50081"


def test_the_targets_the_scaler_starts_are_configured_like_the_suites_own():
    """Its model, threads, draft and log level, a /metrics of their own, and
    logs beside the suite's (not in one folder every suite on the machine shares)."""
    specs = {s.name: s for s in plan(UpOptions(home=Path("/h"), base_port=56051, log_level="debug"), cpus=2)}
    scaler, target = specs["scaler"], specs["target"]
    assert arg(scaler, "--target-model") == arg(target, "--model") == "/h/models/target"
    assert arg(scaler, "--log-dir") == "/h/logs/56051/scaled"
    scaled = shlex.split(arg(scaler, "--target-args"))
    assert scaled[scaled.index("--threads") + 1] == arg(target, "--threads")
    assert scaled[scaled.index("--draft-address") + 1] == arg(target, "--draft-address") == "127.0.0.1:56071"
    assert scaled[scaled.index("--metrics-port") + 1] == "0"  # a free port each: the suite's is the target's
    assert scaled[scaled.index("--log-level") + 1] == "debug"


def test_plan_shares_two_cores_between_the_model_processes():
    specs = {s.name: s for s in plan(UpOptions(home=Path("/h")), cpus=2)}
    assert arg(specs["target"], "--threads") == specs["target"].env["OMP_NUM_THREADS"] == "2"
    assert arg(specs["draft"], "--threads") == specs["draft"].env["OMP_NUM_THREADS"] == "1"
    for name in ("router", "monitor", "scaler"):
        assert specs[name].env["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize("cpus", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("threads", [0, 1, 2, 5])
def test_every_process_gets_at_least_one_thread_and_the_draft_no_more_than_the_target(cpus, threads):
    counts = thread_counts(threads, cpus)
    assert all(n >= 1 for n in counts.values())
    assert counts["draft"] <= counts["target"] == (threads or cpus)


def test_a_base_port_offsets_every_port_and_options_reach_the_processes():
    options = UpOptions(home=Path("/h"), host="0.0.0.0", base_port=20000, threads=3, log_level="debug",
                        target_model=Path("/m/t"), draft_model=Path("/m/d"))
    specs = {s.name: s for s in plan(options, cpus=2)}
    assert {n: s.port for n, s in specs.items()} == {
        "router": 20000, "target": 20010, "draft": 20020, "monitor": 20030, "scaler": 20040}
    assert arg(specs["monitor"], "--prometheus-port") == "20031"
    assert arg(specs["target"], "--model") == "/m/t" and arg(specs["draft"], "--model") == "/m/d"
    assert arg(specs["target"], "--threads") == "3"
    assert all(arg(s, "--host") == "0.0.0.0" and arg(s, "--log-level") == "debug" for s in specs.values())
    assert arg(specs["target"], "--metrics-port") == "20012" and arg(specs["draft"], "--metrics-port") == "20022"
    assert arg(specs["scaler"], "--metrics-port") == "20042"
    assert arg(specs["router"], "--http-port") == "20032"
    assert len(set(ports(20000).values())) == 10


def test_ports_out_of_range_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        ports(65500)


# -- argument parsing ----------------------------------------------------------

def test_generate_flags_become_a_request_and_unset_ones_stay_unset():
    args = build_parser().parse_args(["generate", "hello", "--max-tokens", "9", "--temperature", "0.7",
                                      "--top-k", "5", "--stop", "a", "b", "--stop", "c", "--priority", "batch",
                                      "--no-speculate", "--gamma", "3"])
    req = build_request(args)
    assert req.prompt.text == "hello" and req.sampling.max_new_tokens == 9
    assert req.sampling.temperature == pytest.approx(0.7) and req.sampling.top_k == 5
    assert not req.sampling.HasField("top_p") and not req.sampling.HasField("seed")
    assert list(req.sampling.stop) == ["a", "b", "c"]
    assert req.priority == gen.PRIORITY_BATCH
    assert req.speculation.HasField("enabled") and req.speculation.enabled is False
    assert req.speculation.gamma == 3

    plain = build_request(build_parser().parse_args(["generate", "hi"]))
    assert plain.sampling.temperature == 0.0 and plain.priority == gen.PRIORITY_NORMAL
    assert not plain.speculation.HasField("enabled") and not plain.speculation.HasField("gamma")
    assert plain.speculation.method == gen.SPECULATION_METHOD_UNSPECIFIED  # the target's, with its fallback

    pinned = build_request(build_parser().parse_args(["generate", "hi", "--speculate",
                                                      "--speculative-method", "ngram"]))
    assert pinned.speculation.enabled and pinned.speculation.method == gen.SPECULATION_METHOD_NGRAM
    # The method alone: no "enabled" sent, and the target speculates for a request that names one.
    named = build_request(build_parser().parse_args(["generate", "hi", "--speculative-method", "ngram"]))
    assert not named.speculation.HasField("enabled") and named.speculation.method == gen.SPECULATION_METHOD_NGRAM


def test_the_summary_says_how_the_stream_speculated():
    """A user who asked for speculation learns which proposer served it, and why it fell back."""
    from services.cli.generate import summary

    last = gen.GenerateChunk(finish_reason=gen.FINISH_REASON_LENGTH)
    last.speculation.method = gen.SPECULATION_METHOD_NGRAM
    last.speculation.proposed_tokens, last.speculation.accepted_tokens = 40, 9
    last.speculation.fallback_reason = "at acceptance 0.20 the cost model would not speculate"
    line = summary(32, 0.05, 0.2, last)
    # The counts cover both methods: the line does not credit them all to ngram.
    assert "speculation draft_model, then ngram: accepted 9/40 proposed tokens" in line
    assert "(fell back: at acceptance 0.20" in line
    last.speculation.fallback_reason = "no draft to propose with"  # ngram from the first round
    assert "speculation ngram: accepted 9/40 proposed tokens (no draft to propose with)" in summary(32, 0.05, 0.2, last)
    last.speculation.method, last.speculation.fallback_reason = gen.SPECULATION_METHOD_DRAFT_MODEL, ""
    assert "speculation draft_model: accepted 9/40" in summary(32, 0.05, 0.2, last)
    with pytest.raises(SystemExit):  # the services' bound, said before a request is sent
        build_parser().parse_args(["generate", "hi", "--gamma", "17"])
    from services.cli import argtypes
    from services.common.validation import MAX_GAMMA
    assert argtypes.MAX_GAMMA == MAX_GAMMA
    assert "speculation" not in summary(32, 0.05, 0.2, gen.GenerateChunk(finish_reason=gen.FINISH_REASON_LENGTH))
    # Asked for and never proposed: the line says so, and why, instead of saying nothing.
    none = gen.GenerateChunk(finish_reason=gen.FINISH_REASON_LENGTH)
    none.speculation.method = gen.SPECULATION_METHOD_DRAFT_MODEL
    assert "speculation draft_model: no tokens proposed (the target judged speculation would not pay" in \
        summary(32, 0.05, 0.2, none)
    none.speculation.draft_timeouts = 2
    assert "no tokens proposed (2 rounds passed their deadline)" in summary(32, 0.05, 0.2, none)


def test_up_flags_become_options(tmp_path):
    args = build_parser().parse_args(["up", "--home", str(tmp_path), "--base-port", "30000", "--threads", "1",
                                      "--target-model", "/t", "--keep-going"])
    options = launcher.options_of(args)
    assert options.home == tmp_path and options.base_port == 30000 and options.threads == 1
    assert options.target_model == Path("/t") and options.draft_model is None and args.keep_going


def test_unknown_flags_are_an_error_except_for_pass_through_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["status", "--bogus"])
    assert exc.value.code == 2 and "--bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["serve", "target", "--help"])  # the target's own help
    assert exc.value.code == 0 and "--draft-address" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["generate hi", "status", "down", "certs", "up"])
def test_an_unknown_flag_shows_the_commands_own_usage(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command.split(), "--bogus"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"usage: llmesh {command.split()[0]} ")
    assert f"llmesh {command.split()[0]}: error: unrecognized arguments: --bogus" in err


@pytest.mark.parametrize("command, listed", [("models", "build"), ("serve", "draft,monitor,router,scaler,target")])
def test_help_of_a_command_with_subcommands_lists_them_and_succeeds(command, listed, capsys):
    assert main([command, "--help"]) == 0
    assert listed in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # no subcommand: a usage error that names them
        main([command])
    assert exc.value.code == 2 and f"llmesh {command}: error: give a " in capsys.readouterr().err


def test_models_build_and_serve_hand_their_arguments_on(monkeypatch):
    seen = {}

    def add_arguments(parser):
        parser.add_argument("--seed", type=int)
        parser.add_argument("--force", action="store_true")

    def run_build(args):
        seen["build"] = vars(args)
        return 0

    def run_service(argv):
        seen["serve"] = argv
        return 0

    build = types.ModuleType("services.models.build")
    build.add_arguments, build.run = add_arguments, run_build
    service = types.ModuleType("fake_service_main")
    service.main = run_service
    monkeypatch.setitem(sys.modules, "services.models.build", build)
    monkeypatch.setitem(sys.modules, "fake_service_main", service)
    monkeypatch.setitem(MODULES, "scaler", "fake_service_main")
    assert main(["models", "build", "--seed", "3", "--force"]) == 0
    assert main(["serve", "scaler", "--port", "7", "--router", "r:1"]) == 0
    assert seen == {"build": {"seed": 3, "force": True}, "serve": ["--port", "7", "--router", "r:1"]}


@pytest.mark.parametrize("error, line", [
    (FileNotFoundError(2, "No such file or directory", "/proc/nope"),
     "llmesh models: cannot use /proc/nope: no such file or directory"),
    (NotADirectoryError(20, "Not a directory", "/tmp/f/models"), "llmesh models: cannot use /tmp/f/models: not a directory"),
    (OSError(28, "No space left on device"), "llmesh models: no space left on device"),
])
def test_an_os_error_from_a_command_is_one_line_and_exit_1(error, line, monkeypatch, capsys):
    def run_build(args):
        raise error

    build = types.ModuleType("services.models.build")
    build.add_arguments, build.run = lambda parser: None, run_build
    monkeypatch.setitem(sys.modules, "services.models.build", build)
    assert main(["models", "build"]) == 1
    assert capsys.readouterr().err == line + "\n"


@pytest.mark.parametrize("command", [["generate", "hi"], ["status"]])
def test_tls_files_that_cannot_be_read_are_one_line_naming_the_flag(command, tmp_path, monkeypatch, capsys):
    """Checked before a channel is opened: gRPC reads the files then, with a traceback."""
    monkeypatch.setenv("LLMESH_HOME", str(tmp_path / "home"))  # no certificates made there
    (tmp_path / "plain.txt").write_text("not a certificate\n")
    nowhere = f"127.0.0.1:{free_port()}"
    for flags, line in (
        (["--tls"], f"--tls: cannot read {tmp_path}/home/certs/cli.crt: No such file or directory "
                    "(make them with `llmesh certs`"),
        (["--tls-ca", "/nonexistent.pem"], "--tls-ca: cannot read /nonexistent.pem: No such file or directory"),
        (["--tls-ca", str(tmp_path)], f"--tls-ca: cannot read {tmp_path}: Is a directory"),
        (["--tls-ca", str(tmp_path / "plain.txt")], f"--tls-ca: {tmp_path}/plain.txt is not a PEM file"),
    ):
        assert main([*command, "--router", nowhere, *flags]) == 2
        out, err = capsys.readouterr()
        assert err.startswith(f"llmesh {command[0]}: {line}") and err.count("\n") == 1 and not out


def test_models_build_into_a_home_that_is_a_file_says_so_in_one_line(tmp_path):
    home = tmp_path / "home"
    home.write_text("")
    result = subprocess.run([sys.executable, "-m", "services.cli.main", "models", "build", "--home", str(home),
                             "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == f"llmesh models: cannot use {home}/models: not a directory\n"


def test_llmesh_help_lists_the_commands_without_loading_torch_or_grpc():
    code = ("import sys, contextlib, io\n"
            "from services.cli.main import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try: main(['--help'])\n"
            "    except SystemExit as e: assert e.code == 0\n"
            "print(out.getvalue())\n"
            "print('heavy:', sorted(m for m in ('torch', 'grpc', 'transformers') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("up", "generate", "status", "models", "serve"):
        assert f"    {command} " in result.stdout
    assert "heavy: []" in result.stdout


# -- preflight -------------------------------------------------------------------

def test_up_without_models_says_to_build_them(tmp_path, capsys):
    assert main(["up", "--home", str(tmp_path)]) == 2
    assert "run `llmesh models build`" in capsys.readouterr().err


def test_up_refuses_a_busy_port(tmp_path, capsys):
    for role in ("target", "draft"):
        (tmp_path / "models" / role).mkdir(parents=True)
        (tmp_path / "models" / role / "config.json").write_text("{}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
        assert processes.busy_ports("127.0.0.1", [taken]) == [taken]
        assert main(["up", "--home", str(tmp_path), "--base-port", str(taken - 10)]) == 2
    assert f"{taken} (target)" in capsys.readouterr().err


# -- the supervisor, on throwaway processes ----------------------------------------

CHILD = textwrap.dedent("""
    import signal, sys, time
    mode = sys.argv[1]
    print("child", mode, "started", flush=True)
    if mode == "crash":
        sys.exit(3)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(0.05)  # sleep-ok: a throwaway child idling until it is signalled
""")


def fleet_of(tmp_path, *modes: str) -> processes.ProcessGroup:
    (tmp_path / "llmesh_test_child.py").write_text(CHILD)
    specs = [ServiceSpec(name=f"{mode}{i}", module="llmesh_test_child", port=1 + i, args=(mode,),
                         env={"PYTHONPATH": str(tmp_path)}) for i, mode in enumerate(modes)]
    return processes.ProcessGroup(specs, tmp_path / "logs")


def wait_for_log(fleet, text):
    deadline = time.monotonic() + 30
    while not all(text in processes.tail(c.log_path) for c in fleet.children):
        assert time.monotonic() < deadline, "children did not start"
        time.sleep(0.05)  # sleep-ok: bounded poll of a condition


def test_a_child_that_dies_before_it_is_ready_is_named_with_its_log(tmp_path):
    fleet = fleet_of(tmp_path, "calm", "crash")
    fleet.start()
    try:
        with pytest.raises(processes.LaunchError) as exc:
            fleet.wait_ready(30, is_serving=lambda address: False)
        assert "crash1" in str(exc.value) and "exited with code 3" in str(exc.value)
        assert "child crash started" in str(exc.value)
    finally:
        assert fleet.stop(5)["calm0"] == 0


def test_a_child_that_is_never_ready_times_out(tmp_path):
    fleet = fleet_of(tmp_path, "calm")
    fleet.start()
    try:
        with pytest.raises(processes.LaunchError, match="calm0 .* was not SERVING after 0 s"):
            fleet.wait_ready(0.3, is_serving=lambda address: False)
    finally:
        fleet.stop(5)


def test_a_stop_request_during_start_up_ends_the_wait(tmp_path):
    fleet = fleet_of(tmp_path, "calm")
    fleet.start()
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    try:
        assert fleet.wait_ready(30, is_serving=lambda address: False, stop=stop) is False
    finally:
        assert fleet.stop(5) == {"calm0": 0}


def test_a_death_stops_the_rest_and_a_stubborn_child_is_killed(tmp_path, capsys):
    fleet = fleet_of(tmp_path, "calm", "calm", "stubborn")
    fleet.start()
    ready = []
    assert fleet.wait_ready(30, is_serving=lambda address: True, on_ready=lambda c, w: ready.append(c.name))
    assert ready == ["calm0", "calm1", "stubborn2"]
    wait_for_log(fleet, "started")
    os.kill(fleet.children[0].proc.pid, signal.SIGKILL)
    assert processes.supervise(fleet, threading.Event()) is False
    assert "calm0 (pid" in capsys.readouterr().err
    codes = fleet.stop(0.5)
    assert codes == {"calm0": -signal.SIGKILL, "calm1": 0, "stubborn2": -signal.SIGKILL}


def test_keep_going_leaves_the_others_running_until_stopped(tmp_path):
    fleet = fleet_of(tmp_path, "calm", "calm")
    fleet.start()
    wait_for_log(fleet, "started")
    stop = threading.Event()
    os.kill(fleet.children[1].proc.pid, signal.SIGKILL)
    threading.Timer(1.0, stop.set).start()
    assert processes.supervise(fleet, stop, keep_going=True) is False
    assert fleet.children[0].proc.poll() is None
    assert fleet.stop(5)["calm0"] == 0


def test_the_restart_backoff_doubles_and_gives_up_past_the_start_limit():
    policy = processes.RestartPolicy(max_restarts=3, window_s=60, backoff_s=1, max_backoff_s=3)
    assert [policy.delay([0.0] * n, 10.0) for n in (1, 2, 3, 4)] == [1, 2, 3, None]  # capped, then given up
    assert policy.delay([0.0, 0.0, 0.0, 100.0], 100.0) == 1  # deaths older than the window are forgotten


def test_a_dead_service_is_started_again_and_the_others_keep_running(tmp_path, capsys):
    fleet = fleet_of(tmp_path, "calm", "calm")
    fleet.start()
    wait_for_log(fleet, "started")
    first, other = fleet.children[1].proc.pid, fleet.children[0].proc.pid
    os.kill(first, signal.SIGKILL)
    stop, restarted = threading.Event(), []

    def on_restart(child):
        restarted.append(child)
        wait_for_log(fleet, "started")
        stop.set()

    policy = processes.RestartPolicy(backoff_s=0.1)
    assert processes.supervise(fleet, stop, restart=policy, on_restart=on_restart) is False  # it did die
    assert [c.name for c in restarted] == ["calm1"] and restarted[0] is fleet.children[1]
    assert fleet.children[1].proc.pid != first and fleet.children[1].proc.poll() is None
    assert fleet.children[0].proc.pid == other and fleet.children[0].proc.poll() is None
    assert "child calm started" in (tmp_path / "logs" / "calm1.log.1").read_text()  # the death's log is kept
    assert "calm1 started again" in capsys.readouterr().err
    assert fleet.stop(5) == {"calm0": 0, "calm1": 0}


def test_a_service_stopped_by_sigterm_is_not_started_again(tmp_path, capsys):
    fleet = fleet_of(tmp_path, "calm", "calm")
    fleet.start()
    wait_for_log(fleet, "started")
    fleet.children[1].proc.send_signal(signal.SIGTERM)  # someone stopped it: not a failure
    assert processes.supervise(fleet, threading.Event(), restart=processes.RestartPolicy(backoff_s=0.05)) is False
    assert "it was stopped, not started again; stopping the others" in capsys.readouterr().err
    assert fleet.stop(5) == {"calm0": 0, "calm1": 0}


def test_a_service_that_keeps_dying_is_given_up_on(tmp_path, capsys):
    fleet = fleet_of(tmp_path, "calm", "crash")
    fleet.start()
    policy = processes.RestartPolicy(max_restarts=2, backoff_s=0.05)
    assert processes.supervise(fleet, threading.Event(), restart=policy) is False  # returns: no endless loop
    err = capsys.readouterr().err
    assert err.count("crash1 started again") == 2 and "it died 3 times within 600 s; stopping the others" in err
    assert fleet.stop(5)["calm0"] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_services_do_not_outlive_a_killed_launcher(tmp_path):
    # A real service (the router: no model to load), so the test covers the
    # service's own half of the arrangement, not just the launcher's.
    port = free_port()
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from services.common.processes import ProcessGroup
        from services.common.suite import ServiceSpec
        spec = ServiceSpec(name="router", module="router.main", port={port},
                           args=("--port", "{port}", "--http-port", "0", "--host", "127.0.0.1"))
        fleet = ProcessGroup([spec], Path({str(tmp_path / "logs")!r}))
        fleet.start()
        print(fleet.children[0].proc.pid, flush=True)
        time.sleep(60)  # sleep-ok: the parent stays up until the test kills it
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    log = tmp_path / "logs" / "router.log"
    deadline = time.monotonic() + 30
    while "routing on" not in (log.read_text() if log.exists() else "") and running(child):
        assert time.monotonic() < deadline, "the router did not start"
        time.sleep(0.05)  # sleep-ok: bounded poll of another process's log
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while running(child):
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the service outlived its launcher")
        time.sleep(0.05)  # sleep-ok: bounded poll of another process's state


def test_a_service_whose_launcher_is_already_gone_knows_it():
    assert lifeline.bind_to_launcher({}) is True  # started by hand: nothing to bind to
    assert lifeline.bind_to_launcher({lifeline.PARENT_ENV: str(os.getppid())}) is True
    assert lifeline.bind_to_launcher({lifeline.PARENT_ENV: "1" + str(os.getppid())}) is False


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (Linux /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- healthcheck and status against real servers -------------------------------------

@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_healthcheck_exits_0_only_when_serving(health_server, capsys):
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("llmesh.v1.Router", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main([address]) == 0
    assert capsys.readouterr().out.strip() == f"{address}: SERVING"
    assert healthcheck.main([address, "--service", "llmesh.v1.Router"]) == 1
    assert healthcheck.check(address, "llmesh.v1.Nope") == "SERVICE_UNKNOWN"
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main([address]) == 1
    assert healthcheck.check(f"127.0.0.1:{free_port()}", timeout=0.5) == healthcheck.UNREACHABLE


def test_healthcheck_module_runs_as_a_container_command(health_server):
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    result = subprocess.run([sys.executable, "-m", "services.common.healthcheck", address], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "SERVING" in result.stdout


def test_status_shows_unreachable_services_without_a_traceback(health_server, capsys):
    servicer, address = health_server
    servicer.set("llmesh.v1.Monitor", health_pb2.HealthCheckResponse.SERVING)
    nowhere = f"127.0.0.1:{free_port()}"
    assert main(["status", "--router", nowhere, "--monitor", address, "--scaler", nowhere, "--timeout", "1"]) == 1
    out = capsys.readouterr().out
    assert f"router   {nowhere}  UNREACHABLE" in out and f"monitor  {address}  SERVING" in out
    assert "model instances: unknown (router: UNAVAILABLE" in out
    assert "Traceback" not in out


@pytest.fixture
def fake_target():
    """A small real server that says it is a target: health and reflection name llmesh.v1.TargetModel
    (its methods are not there; the CLI's calls fail with UNIMPLEMENTED, as a real target's would)."""
    from grpc_reflection.v1alpha import reflection

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    for name in ("", "llmesh.v1.TargetModel"):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(["llmesh.v1.TargetModel", "llmesh.v1.Stats", "grpc.health.v1.Health",
                                         reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_generate_at_a_service_that_is_not_a_router_says_what_it_is(fake_target, capsys):
    assert main(["generate", "hi", "--router", fake_target, "--timeout", "5"]) == 1
    assert capsys.readouterr().err == (f"llmesh generate: {fake_target} is not a llmesh router (it does not serve "
                                       f"llmesh.v1.Router; it serves llmesh.v1.TargetModel)\n")


def test_status_at_services_that_are_not_router_monitor_scaler_says_what_they_are(fake_target, health_server,
                                                                                   capsys):
    _, plain = health_server  # health only, no reflection: nothing more to say than what it is not
    assert main(["status", "--router", fake_target, "--monitor", fake_target, "--scaler", plain,
                 "--timeout", "2"]) == 1
    out = capsys.readouterr().out
    assert f"router   {fake_target}  SERVICE_UNKNOWN" in out and f"monitor  {fake_target}  SERVICE_UNKNOWN" in out
    serves = "; it serves llmesh.v1.TargetModel)"
    assert (f"model instances: unknown (router: {fake_target} is not a llmesh router (it does not serve "
            f"llmesh.v1.Router{serves})") in out
    assert f"fleet throughput: unknown (monitor: {fake_target} is not a llmesh monitor" in out
    assert f"top recommendation: unknown (monitor: {fake_target} is not a llmesh monitor" in out
    assert f"pools: unknown (scaler: {plain} is not a llmesh scaler (it does not serve llmesh.v1.Scaler))" in out


def test_status_renders_instances_and_throughput():
    snapshot = {
        "services": [{"name": "router", "address": "r:1", "health": "SERVING"}],
        "instances": [{"id": "t@1", "address": "t:1", "role": "target", "pool": "default", "health": "serving",
                       "state": "active", "queue": 2, "running": 3, "tokens_per_second": 41.5,
                       "utilization": 0.5, "kv_usage": 0.25, "prefix_cache_hits": 300,
                       "prefix_cache_queries": 400, "preemptions": 2},
                      {"id": "m@2", "address": "m:2", "role": "target", "pool": "default", "health": "not_serving",
                       "state": "active", "queue": 0, "running": 0, "tokens_per_second": 0.0, "utilization": 0.0,
                       "problem": "does not answer as a target (UNIMPLEMENTED)"}],
        "throughput": {"window_s": 10.0, "requests_per_second": 1.5, "tokens_per_second": 41.5,
                       "accelerator_utilization": 0.5, "queue_length": 2, "in_flight": 5, "instances": 1},
    }
    lines = status.render(snapshot).splitlines()
    assert "  m@2 gets no requests: does not answer as a target (UNIMPLEMENTED)" in lines
    assert lines[-1].endswith("· 5 in flight · 1 instance")
    assert lines[:3] == ["SERVICE  ADDRESS  HEALTH", "router   r:1      SERVING", ""]
    assert lines[3].split() == ["INSTANCE", "ROLE", "ADDRESS", "HEALTH", "STATE", "POOL", "QUEUE", "RUNNING",
                                "TOK/S", "UTIL", "KV", "HIT", "PREEMPT"]
    # KV: blocks in use; HIT: prefix-cache hit tokens / looked-up tokens; PREEMPT: sequences preempted.
    assert lines[4].split() == ["t@1", "target", "t:1", "serving", "active", "default", "2", "3", "41.5", "50%",
                                "25%", "75%", "2"]
    assert lines[-1].startswith("fleet over 10 s: 1.50 req/s · 41.5 tokens/s · utilisation 50%")


@pytest.mark.parametrize("argv", [
    ["generate", "hi", "--seed", "-1"], ["generate", "hi", "--seed", str(2**64)],
    ["generate", "hi", "--max-tokens", str(2**31)], ["generate", "hi", "--max-tokens", "0"],
    ["generate", "hi", "--top-k", "99999999999"], ["generate", "hi", "--gamma", "99999999999"],
    ["generate", "hi", "--timeout", "1e10"], ["generate", "hi", "--timeout", "nan"],
    ["generate", "hi", "--timeout", "0"], ["generate", "hi", "--top-p", "0"],
    ["generate", "hi", "--temperature", "inf"], ["status", "--timeout", "-1"],
    ["up", "--base-port", "70000"], ["up", "--grace-period", "inf"], ["bench", "--streams", "0"],
])
def test_numeric_flags_out_of_range_are_usage_errors_not_tracebacks(argv, capsys):
    """Values protobuf or gRPC would choke on later (int32/uint64 overflow, a
    deadline gRPC cannot represent) are refused by argparse, naming the flag."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {next(a for a in argv if a.startswith('--'))}:" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["generate", "hi", "--router", "127.0.0.1:99999"], ["generate", "hi", "--router", "127.0.0.1:0"],
    ["status", "--router", "127.0.0.1:65536"], ["status", "--monitor", "127.0.0.1:-1"],
    ["status", "--scaler", "127.0.0.1:70000"], ["bench", "--router", "127.0.0.1:99999"],
])
def test_a_port_out_of_range_is_a_usage_error_naming_the_flag_and_the_range(argv, capsys):
    """gRPC would take port 99999 and connect to 99999 - 65536."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {argv[-2]}:" in err and "[1, 65535]" in err


@pytest.mark.parametrize("text", ["nonsense", ":50051", "::1:50051", "127.0.0.1:", "127.0.0.1:x", "a b:1",
                                  "127.0.0.1:000050051", "127.0.0.1:+5", "[::1]:50051", "router:50051",
                                  "10.0.0.5:1", "localhost:65535"])
def test_the_cli_takes_the_addresses_the_services_take(text):
    """argtypes cannot import services.common.validation (grpc, for `llmesh --help`): same rule, kept here."""
    from services.cli import argtypes
    from services.common.validation import valid_address

    try:
        taken = argtypes.address(text) == text
    except argparse.ArgumentTypeError:
        taken = False
    assert taken == valid_address(text)


def test_status_finds_monitor_and_scaler_next_to_the_router(capsys):
    """Given only --router, status asks the monitor and scaler where `llmesh up`
    puts them: the router's host, at their offsets from its port."""
    from services.common.suite import PORT_OFFSETS

    for _ in range(20):
        base = free_port() - PORT_OFFSETS["router"]
        servers, ok = [], True
        for name in ("monitor", "scaler"):
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            servicer = health.HealthServicer()
            servicer.set(f"llmesh.v1.{name.capitalize()}", health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            try:
                bound = server.add_insecure_port(f"127.0.0.1:{base + PORT_OFFSETS[name]}")
            except RuntimeError:
                bound = 0
            ok = ok and bound == base + PORT_OFFSETS[name]
            servers.append(server)
        if ok:
            break
        for server in servers:
            server.stop(0)
    else:
        pytest.skip("no free port pair next to a free router port")
    for server in servers:
        server.start()
    try:
        router = f"127.0.0.1:{base + PORT_OFFSETS['router']}"
        assert main(["status", "--router", router, "--timeout", "1"]) == 1  # no router there
        out = capsys.readouterr().out
        assert f"monitor  127.0.0.1:{base + PORT_OFFSETS['monitor']}  SERVING" in out
        assert f"scaler   127.0.0.1:{base + PORT_OFFSETS['scaler']}  SERVING" in out
        assert {name: status.suite_address("10.0.0.5:60051", name) for name in PORT_OFFSETS} == {
            "router": "10.0.0.5:60051", "target": "10.0.0.5:60061", "draft": "10.0.0.5:60071",
            "monitor": "10.0.0.5:60081", "scaler": "10.0.0.5:60091"}
    finally:
        for server in servers:
            server.stop(0)


@pytest.mark.parametrize("argv, flag", [
    (["status", "--router", "nonsense"], "argument --router"),
    (["status", "--router", "127.0.0.1:65530"], "give --monitor"),
    (["status", "--router", "127.0.0.1:65520", "--monitor", "127.0.0.1:1"], "give --scaler"),
])
def test_status_never_asks_the_default_suite_for_another_routers_monitor_or_scaler(argv, flag, capsys):
    """Where the monitor and scaler cannot be derived from --router, status says so; asking the
    default addresses instead would mix in another suite's figures."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and flag in err
    assert "50081" not in err and "50091" not in err


@pytest.mark.parametrize("service", sorted(MODULES))
@pytest.mark.parametrize("level", ["chatty", "5"])
def test_a_log_level_logging_does_not_know_is_a_usage_error_of_every_service(service, level, capsys):
    """Before, the service started, crashed in logging.basicConfig with a traceback, and `up` stopped the suite."""
    with pytest.raises(SystemExit) as exit_:
        main(["serve", service, "--port", "0", "--log-level", level])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument --log-level: '{level}' is not one of: debug, info, warning" in err
    assert "Traceback" not in err


def test_up_checks_the_log_level_before_starting_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["up", "--home", str(tmp_path), "--log-level", "chatty"])
    assert exit_.value.code == 2 and "argument --log-level: invalid choice: 'chatty'" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()
    assert build_parser().parse_args(["up", "--log-level", "DEBUG"]).log_level == "debug"


def test_a_log_level_from_the_environment_is_checked_too():
    from monitor.config import MonitorConfig
    from services.common.config import ConfigError, LogLevel

    with pytest.raises(ConfigError, match="LLMESH_LOG_LEVEL: 'chatty' is not one of"):
        MonitorConfig.from_args([], env={"LLMESH_LOG_LEVEL": "chatty"})
    assert MonitorConfig.from_args([], env={"LLMESH_LOG_LEVEL": "WARNING"}).log_level is LogLevel.WARNING


def test_up_insecure_passes_a_flag_each_service_accepts():
    from monitor.config import MonitorConfig
    from router.config import RouterConfig
    from scaler.config import ScalerConfig
    from services.draft.config import DraftConfig
    from services.target.config import TargetConfig

    configs = {"router": RouterConfig, "target": TargetConfig, "draft": DraftConfig, "monitor": MonitorConfig,
               "scaler": ScalerConfig}
    for spec in plan(UpOptions(home=Path("/h"), host="0.0.0.0", insecure=True), cpus=2):
        assert configs[spec.name].from_args(list(spec.args), env={}).insecure is True


# -- `llmesh down`, against records and throwaway launchers ---------------------------

#: A stand-in for `llmesh up` (its command line names services.cli, as the real one's does):
#: on SIGTERM it removes its record after a moment, as up does once its services have exited.
FAKE_UP = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    record, mode = Path(sys.argv[1]), sys.argv[2]
    def stop(*_):
        time.sleep(0.3)  # sleep-ok: stands for the services' grace period
        record.unlink()
        sys.exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else stop)
    print("up", flush=True)
    while True:
        time.sleep(0.05)  # sleep-ok: idles until signalled
""")


@pytest.fixture
def fake_up(tmp_path):
    """``fake_up(home, base_port, mode="calm")``: a stand-in launcher running with its record
    written; whatever is still running is killed after the test."""
    script = tmp_path / "services.cli.fake_up.py"
    script.write_text(FAKE_UP)
    started: list[subprocess.Popen] = []

    def start(home, base_port: int, mode: str = "calm") -> subprocess.Popen:
        record = runfile.path_for(home, base_port)
        proc = subprocess.Popen([sys.executable, str(script), str(record), mode], stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline() == "up\n"
        runfile.write(home, runfile.UpRecord(pid=proc.pid, host="127.0.0.1", base_port=base_port,
                                             services={"router": 1, "target": 2}))
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def gone_pid() -> int:
    """The pid of a process that has exited (a launcher killed before `down` runs)."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(gone.stdout)


def test_down_with_nothing_running_says_so_and_succeeds(tmp_path, capsys):
    assert main(["down", "--home", str(tmp_path)]) == 0
    assert "nothing to stop" in capsys.readouterr().out


def test_down_stops_the_suite_and_waits_for_its_record_to_go(tmp_path, capsys, fake_up):
    home = tmp_path / "home"
    proc = fake_up(home, 50051)
    assert main(["down", "--home", str(home)]) == 0
    assert proc.wait(10) == 0
    out = capsys.readouterr().out
    assert "stopping the suite at 127.0.0.1:50051" in out and "stopped the suite at 127.0.0.1:50051" in out
    assert not (home / "run" / "up-50051.json").exists()


def test_down_with_a_base_port_stops_only_that_suite(tmp_path, fake_up):
    home = tmp_path / "home"
    first, second = fake_up(home, 50051), fake_up(home, 56051)
    assert main(["down", "--home", str(home), "--base-port", "56051"]) == 0
    assert second.wait(10) == 0 and first.poll() is None
    assert (home / "run" / "up-50051.json").exists()


def test_down_removes_the_record_of_a_launcher_that_is_gone(tmp_path, capsys):
    home = tmp_path / "home"
    runfile.write(home, runfile.UpRecord(pid=gone_pid(), host="127.0.0.1", base_port=50051))
    assert main(["down", "--home", str(home)]) == 0
    assert "is gone; removed its stale record" in capsys.readouterr().out
    assert not runfile.read_all(home)


def test_down_says_which_suite_did_not_stop_in_time(tmp_path, capsys, fake_up):
    home = tmp_path / "home"
    fake_up(home, 50051, mode="stubborn")
    assert main(["down", "--home", str(home), "--timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "127.0.0.1:50051" in err and "still stopping after 0.5 s" in err


def test_down_does_not_signal_a_process_that_took_a_stale_records_pid(tmp_path, capsys, fake_up):
    """A record written before its pid's current process started is not that process's: it is stale."""
    home = tmp_path / "home"
    proc = fake_up(home, 50051)
    runfile.write(home, runfile.UpRecord(pid=proc.pid, host="127.0.0.1", base_port=50051,
                                         started=time.time() - 3600))
    assert main(["down", "--home", str(home)]) == 0
    assert "stale record" in capsys.readouterr().out
    time.sleep(0.5)  # sleep-ok: long enough for a SIGTERM, had one been sent, to end it
    assert proc.poll() is None


def test_down_waits_for_the_services_of_a_launcher_that_is_gone(tmp_path, capsys):
    """Killed with SIGKILL, `llmesh up` leaves its services to stop by themselves (their lifeline):
    `down` removes the stale record and waits until they have, instead of saying so while they run."""
    home = tmp_path / "home"
    script = tmp_path / "services.target.main.py"  # its command line names the service's module
    script.write_text("import time\nprint('up', flush=True)\ntime.sleep(1.0)  # sleep-ok: stands for the lifeline\n")
    service = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert service.stdout.readline() == "up\n"
    runfile.write(home, runfile.UpRecord(pid=gone_pid(), host="127.0.0.1", base_port=50051,
                                         services={"target": service.pid}))
    try:
        assert main(["down", "--home", str(home)]) == 0
        out = capsys.readouterr().out
        assert "removed its stale record; waiting for its 1 services" in out and "stopped the suite at" in out
        assert service.poll() is not None  # down returned only once the service had exited
        assert not runfile.read_all(home)
    finally:
        service.kill()
        service.wait()


def test_down_with_a_port_that_matches_no_suite_names_the_ones_running_and_fails(tmp_path, capsys, fake_up):
    """Asked to stop one suite that is not there, `down` fails: a script that goes on as if it had
    stopped would find its ports still taken, or the wrong suite gone."""
    home = tmp_path / "home"
    proc = fake_up(home, 50051)
    assert main(["down", "--home", str(home), "--base-port", "50052"]) == 1
    err = capsys.readouterr().err
    assert "no suite on port 50052" in err and "recorded: 127.0.0.1:50051" in err
    assert proc.poll() is None  # the other suite was left alone
    assert main(["down", "--home", str(tmp_path / "empty"), "--base-port", "50052"]) == 1
    assert "no suite on port 50052 is recorded" in capsys.readouterr().err
