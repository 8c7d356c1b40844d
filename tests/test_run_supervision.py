"""``make run`` under supervision: the static supervisord configuration as supervisord
reads it, the log relay, restarts, the banner, a second shell, and stopping.

The slow tests run real processes. Those marked ``platform`` start the whole platform
the way ``make run`` does (``python -m devtools.localservices run --run-dir DIR --
python -m devtools.run``), once for the module, with a private run dir under the
repository's ``.run/pytest/`` (the embedded PostgreSQL runs as a system user when the
tests run as root and must reach its data dir, which pytest's 0700 temporary root
would not allow), a free web port and private embedded PostgreSQL and Redis: a
developer's ``make run`` on the same checkout is untouched.
"""

from __future__ import annotations

import configparser
import csv
import functools
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import xmlrpc.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import psycopg2
import pytest

from devtools.base import free_port
from devtools.logrelay import LogRelay
from devtools.supervise import (
    CONFIG,
    REPLAY_CONFIG,
    REPLAY_NAME,
    SupervisorFiles,
    control_config,
    process_states,
    programs,
    supervisord_environment,
)
from tests.test_heads import write_generated_split
from twiscope.platform_env import load_platform_env

BASE_DIR = Path(__file__).resolve().parent.parent
SAMPLES = BASE_DIR / "tests" / "samples"
# The processes of one platform (the Procfile's, before it became devtools/supervisord.conf).
PLATFORM_PROGRAMS = {
    "web",
    "worker-ingest",
    "worker-enrich",
    "worker-detect",
    "worker-anomalies",
    "worker-inference",
    "worker-alerts",
    "worker-notify",
    "sources",
    "beat",
}
# What a new terminal has: no DATABASE_URL, REDIS_URL, SECRET_KEY or settings module.
SHELL_BASICS = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "LOGNAME")


def _shell_environment(**extra: str) -> dict[str, str]:
    return {**{key: os.environ[key] for key in SHELL_BASICS if key in os.environ}, **extra}


def _wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.2
) -> Any:
    """``condition()``'s first truthy value within ``timeout_s``; fails naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _distinct_posts(archive: Path) -> int:
    """Distinct ``tweet_id`` values of an airline-format CSV: the posts it holds."""
    with archive.open(encoding="utf-8", newline="") as fh:
        return len({row["tweet_id"] for row in csv.DictReader(fh)})


def _gone(pids: list[int]) -> bool:
    return not [pid for pid in pids if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _port_closed(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _answers(port: int) -> bool:
    """Whether an HTTP server answers ``GET /`` on 127.0.0.1:``port`` (any status)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/")
        connection.getresponse().read()
    except OSError:
        return False
    finally:
        connection.close()
    return True


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = BASE_DIR / ".run" / "pytest" / uuid.uuid4().hex[:12]
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- the configuration, as supervisord reads it ----------------------------------------------

READ_CONFIG = """
import json, os, sys
from supervisor.options import ServerOptions
options = ServerOptions()
options.realize(args=["-c", sys.argv[1]])
print(json.dumps({
    "uid": options.uid,
    "criticals": options.parse_criticals,
    "socket": options.server_configs[0]["file"],
    "groups": {
        group.name: [
            {
                "name": p.name,
                "command": p.command,
                "directory": os.path.realpath(p.directory),
                "autostart": p.autostart,
                "priority": p.priority,
                "autorestart": p.autorestart.__name__ if isinstance(p.autorestart, type)
                else p.autorestart,
                "startsecs": p.startsecs,
                "stopwaitsecs": p.stopwaitsecs,
                "killasgroup": p.killasgroup,
                "stdout_logfile": p.stdout_logfile,
            }
            for p in group.process_configs
        ]
        for group in options.process_group_configs
    },
}))
"""


def _as_supervisord_reads_it(
    run_dir: Path, *, replay: bool = False, as_root: bool = False, port: str = "8123"
) -> dict[str, Any]:
    """``devtools/supervisord.conf`` parsed by supervisord's own reader, in the
    environment ``devtools.supervise`` gives it (a child process: the reader takes
    ``%(ENV_...)s`` from ``os.environ``)."""
    files = SupervisorFiles(run_dir)
    for directory in (files.control.parent, files.log_dir):
        directory.mkdir(parents=True, exist_ok=True)
    files.control.write_text(control_config(files, password="pw", as_root=as_root))
    includes = [REPLAY_CONFIG] if replay else []
    env = supervisord_environment(_shell_environment(PORT=port), files, includes=includes)
    result = subprocess.run(
        [sys.executable, "-c", READ_CONFIG, str(CONFIG)],
        check=False,
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def test_one_group_holds_every_platform_process(run_dir: Path) -> None:
    parsed = _as_supervisord_reads_it(run_dir)
    names = [p["name"] for p in parsed["groups"]["twiscope"]]

    assert set(parsed["groups"]) == {"twiscope"}
    assert set(names) == PLATFORM_PROGRAMS
    assert [p.name for p in programs()] == names


def test_every_platform_process_is_restarted_and_the_replay_runs_once(run_dir: Path) -> None:
    parsed = _as_supervisord_reads_it(run_dir, replay=True)
    group = {p["name"]: p for p in parsed["groups"]["twiscope"]}
    (replay,) = parsed["groups"][REPLAY_NAME]
    every = [*group.values(), replay]

    assert set(group) == PLATFORM_PROGRAMS
    assert {p["autorestart"] for p in group.values()} == {"RestartUnconditionally"}
    assert {(p["autostart"], p["startsecs"], p["stopwaitsecs"]) for p in group.values()} == {
        (True, 10, 10)
    }
    assert (replay["autostart"], replay["autorestart"], replay["startsecs"]) == (True, False, 0)
    # Stopped first: supervisord stops the group with the highest priority number first.
    assert replay["priority"] > max(p["priority"] for p in group.values())
    assert {p["killasgroup"] for p in every} == {True}
    assert {p["directory"] for p in every} == {str(BASE_DIR.resolve())}
    assert {p["stdout_logfile"] for p in every} == {
        str(run_dir / "log" / f"{p['name']}.log") for p in every
    }
    assert [p.name for p in programs(includes=[REPLAY_CONFIG]) if p.one_shot] == [REPLAY_NAME]


def test_each_process_runs_the_command_the_procfile_had(run_dir: Path) -> None:
    parsed = _as_supervisord_reads_it(run_dir, replay=True, port="8123")
    commands = {p["name"]: p["command"] for group in parsed["groups"].values() for p in group}
    worker = "celery -A twiscope worker -Q {0} -n {0}@%h --pool=prefork --concurrency=1"

    assert commands == {
        "web": "daphne -b 127.0.0.1 -p 8123 twiscope.asgi:application",
        "worker-ingest": f"{worker.format('ingest')} --loglevel=INFO",
        "worker-enrich": f"{worker.format('enrich')} --loglevel=INFO",
        "worker-detect": f"{worker.format('detect')} --loglevel=INFO",
        # Catch-ups of years of buckets take only the CPU the pipeline leaves.
        "worker-anomalies": f"nice -n 10 {worker.format('anomalies')} --prefetch-multiplier=1 "
        "--loglevel=INFO",
        "worker-inference": f"{worker.format('inference')} --prefetch-multiplier=1 --loglevel=INFO",
        "worker-alerts": f"{worker.format('alerts')} --loglevel=INFO",
        # Delivery waits on remote hosts: two processes, so one slow receiver is not all.
        "worker-notify": worker.format("notify").replace("concurrency=1", "concurrency=2")
        + " --loglevel=INFO",
        "sources": "python manage.py run_sources",
        "beat": "celery -A twiscope beat --loglevel=INFO "
        f'--schedule "{run_dir}/celerybeat-schedule"',
        REPLAY_NAME: commands[REPLAY_NAME],
    }
    assert commands[REPLAY_NAME].startswith('/bin/sh -c \'python manage.py replay "$REPLAY"')


def test_supervisord_runs_as_root_without_a_warning_only_when_root(run_dir: Path) -> None:
    files = SupervisorFiles(run_dir)
    as_root = control_config(files, password="pw", as_root=True)
    as_user = control_config(files, password="pw", as_root=False)
    parsed = _as_supervisord_reads_it(run_dir, as_root=os.geteuid() == 0)

    assert "\nuser=root\n" in as_root
    assert "user=" not in as_user
    assert parsed["criticals"] == []
    assert parsed["socket"] == str(files.socket)


def test_a_deep_run_dir_gets_a_control_socket_that_fits(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)

    assert len(str(SupervisorFiles(deep).socket)) <= 100
    assert SupervisorFiles(tmp_path).socket.parent == tmp_path / "supervisor"


def test_a_run_dir_with_a_space_keeps_its_control_file_where_supervisord_can_include_it(
    tmp_path: Path,
) -> None:
    spaced = tmp_path / "my platform"

    assert " " not in str(SupervisorFiles(spaced).control)
    assert SupervisorFiles(tmp_path).control == tmp_path / "supervisor" / "control.conf"


# --- the log relay -------------------------------------------------------------------------


def test_the_relay_prefixes_new_lines_and_follows_a_rotated_file(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text("from an earlier run\n")
    out = io.StringIO()
    relay = LogRelay({"worker": log, "web": tmp_path / "web.log"}, out)
    with log.open("a") as fh:
        fh.write("before rotation\n")
    log.rename(tmp_path / "worker.log.1")
    log.write_text("after rotation\nno newline yet")

    relay.stop()

    assert out.getvalue().splitlines() == [
        "worker | before rotation",
        "worker | after rotation",
        "worker | no newline yet",
    ]


def test_an_announcement_goes_between_relayed_lines(tmp_path: Path) -> None:
    log = tmp_path / "web.log"
    out = io.StringIO()
    relay = LogRelay({"web": log}, out)
    log.write_text("listening\n")
    relay.start()
    _wait_for(lambda: out.getvalue(), 10, "the first line relayed")

    relay.announce("=== banner ===")
    with log.open("a") as fh:
        fh.write("serving\n")
    relay.stop()

    assert out.getvalue().splitlines() == ["web | listening", "=== banner ===", "web | serving"]


# --- supervise(): restarts, the banner and stopping, with small programs --------------------


def _states(files: SupervisorFiles) -> dict[str, dict[str, Any]]:
    """supervisord's view of each process, by name; empty while it does not answer. The
    control password is in the control file, as for supervisorctl."""
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"))
    if not parser.read(files.control):
        return {}
    try:
        states = process_states(files.socket, parser["supervisorctl"]["password"])
    except (OSError, xmlrpc.client.Error):
        return {}
    return {state["name"]: state for state in states}


SUPERVISE = """
import configparser, os, sys
from pathlib import Path
from devtools.supervise import CONFIG, REPLAY_CONFIG, Announcement, SupervisorFiles, supervise

# devtools/supervisord.conf with its programs replaced by small ones: the same
# supervisord settings, and each program supervised as the platform's are (the
# options of [program:web]; the one-shot's of supervisord-replay.conf's [program:replay]).
run_dir, announce_port, specs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"))
parser.read(CONFIG)
long_running = dict(parser["program:web"])
parser.read(REPLAY_CONFIG)
one_shot = dict(parser["program:replay"])
for section in parser.sections():
    if section.startswith(("program:", "group:")):
        parser.remove_section(section)
names = []
for spec in [*specs, "once=echo once done"]:
    name, command = spec.split("=", 1)
    parser[f"program:{name}"] = {
        **(one_shot if name == "once" else long_running), "command": command,
    }
    names.append(name)
parser["group:twiscope"] = {"programs": ",".join(names)}
config = run_dir / "supervisord.conf"
with config.open("w") as fh:
    parser.write(fh)
announcement = None
if announce_port != "-":
    announcement = Announcement(f"http://127.0.0.1:{announce_port}/", "=== ANNOUNCED ===")
files = SupervisorFiles(run_dir)
sys.exit(supervise(dict(os.environ), files, config=config, announcement=announcement))
"""


@dataclass
class Runner:
    """``devtools.supervise.supervise`` in a child process (signals need its main
    thread)."""

    process: subprocess.Popen[str]
    files: SupervisorFiles
    output: list[str] = field(default_factory=list)

    def states(self) -> dict[str, dict[str, Any]]:
        return _states(self.files)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        stdout, _ = self.process.communicate(timeout=60)
        self.output.append(stdout)
        return self.process.returncode


def _start_runner(
    run_dir: Path, *programs: str, announce_port: int | None = None, **env: str
) -> Runner:
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISE, str(run_dir), str(announce_port or "-"), *programs],
        cwd=BASE_DIR,
        env=_shell_environment(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return Runner(process, SupervisorFiles(run_dir))


def _running_pid(runner: Runner, name: str, other_than: int = 0) -> int | None:
    state = runner.states().get(name, {})
    pid: int = state.get("pid", 0)
    return pid if pid and pid != other_than and state["statename"] == "RUNNING" else None


@pytest.mark.slow
def test_a_killed_process_is_restarted_and_a_finished_one_shot_stays_finished(
    run_dir: Path,
) -> None:
    runner = _start_runner(run_dir, "sleeper=sleep 600", "steady=sleep 600")
    try:
        first = _wait_for(lambda: _running_pid(runner, "sleeper"), 30, "sleeper RUNNING")
        steady = _running_pid(runner, "steady")
        os.kill(first, signal.SIGKILL)
        second = _wait_for(lambda: _running_pid(runner, "sleeper", first), 30, "a new sleeper")
        states = runner.states()
    finally:
        status = runner.stop()
    log = "".join(runner.output)

    assert second != first
    assert states["steady"]["pid"] == steady  # the others keep running
    assert states["once"]["statename"] == "EXITED"  # not restarted
    assert "once       | once done" in log
    assert "exited: sleeper (terminated by SIGKILL; not expected)" in log
    assert status == 128 + signal.SIGTERM
    assert _gone([second, states["steady"]["pid"]])


@pytest.mark.slow
def test_a_process_that_cannot_start_stops_the_platform_with_status_1(run_dir: Path) -> None:
    runner = _start_runner(run_dir, "broken=false", "steady=sleep 600")
    try:
        steady = _wait_for(lambda: runner.states().get("steady", {}).get("pid"), 30, "steady")
        log, _ = runner.process.communicate(timeout=60)
    finally:
        if runner.process.poll() is None:
            runner.stop()

    assert runner.process.returncode == 1
    assert "gave up: broken entered FATAL state" in log
    assert "run: supervisord gave up on broken" in log
    assert _gone([steady])


@pytest.mark.slow
def test_a_process_that_gave_up_while_redis_was_down_starts_again_once_it_answers(
    run_dir: Path,
) -> None:
    """A program that exits at once while nothing listens on REDIS_URL's port goes
    FATAL (5 failed starts, about 15 s), as ``sources`` did during a Redis outage; the
    platform keeps running, and once the port answers the program is started again."""
    port = free_port()
    needs_redis = (
        f"needs={sys.executable} -c 'import socket, time; "
        f'socket.create_connection(("127.0.0.1", {port})).close(); time.sleep(600)\''
    )
    runner = _start_runner(
        run_dir, needs_redis, "steady=sleep 600", REDIS_URL=f"redis://127.0.0.1:{port}/0"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as redis_back:
        try:
            _wait_for(
                lambda: runner.states().get("needs", {}).get("statename") == "FATAL",
                60,
                "needs FATAL",
            )
            time.sleep(2 * 0.5)  # two of supervise()'s polls: it would have stopped by now
            alive_while_down = runner.process.poll() is None
            redis_back.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            redis_back.bind(("127.0.0.1", port))
            redis_back.listen(16)
            again = _wait_for(lambda: _running_pid(runner, "needs"), 60, "needs RUNNING again")
        finally:
            status = runner.stop()
    log = "".join(runner.output)

    assert alive_while_down
    assert again
    assert "run: supervisord gave up on needs while redis is down" in log
    assert status == 128 + signal.SIGTERM


@pytest.mark.slow
def test_the_banner_comes_once_the_web_server_answers(run_dir: Path) -> None:
    """A web server that takes 3 s to listen: the announcement must not come before
    it answers (the test asks the server the moment the banner shows)."""
    port = free_port()
    web = f"web=/bin/sh -c 'sleep 3; exec {sys.executable} -m http.server {port} --bind 127.0.0.1'"
    runner = _start_runner(run_dir, web, announce_port=port)
    started = time.monotonic()
    assert runner.process.stdout is not None
    try:
        for line in runner.process.stdout:
            if line.strip() == "=== ANNOUNCED ===":
                answered, waited = _answers(port), time.monotonic() - started
                break
        else:
            pytest.fail("the runner ended without announcing")
    finally:
        status = runner.stop()

    assert answered
    assert waited >= 3
    assert status == 128 + signal.SIGTERM


# --- the whole platform, as `make run` starts it -----------------------------------------


@dataclass
class Platform:
    """A platform started as ``make run`` does, in its own session."""

    process: subprocess.Popen[bytes]
    run_dir: Path
    log_path: Path
    port: int = 0

    @property
    def files(self) -> SupervisorFiles:
        return SupervisorFiles(self.run_dir)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def second_shell(self) -> dict[str, str]:
        """A new terminal's environment, told which platform to talk to."""
        return _shell_environment(TWISCOPE_RUN_DIR=str(self.run_dir))

    def type_in_second_shell(
        self, command: list[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` in the repository as typed in a new terminal (``second_shell``),
        capturing its output as text."""
        return subprocess.run(
            command,
            check=False,
            cwd=BASE_DIR,
            env=self.second_shell(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def services(self) -> dict[str, str]:
        """``DATABASE_URL``, ``REDIS_URL``, ``SECRET_KEY`` as a second shell gets them."""
        environ = {"TWISCOPE_RUN_DIR": str(self.run_dir)}
        load_platform_env(environ)
        return environ

    def states(self) -> dict[str, dict[str, Any]]:
        return _states(self.files)

    def _one(self, query: str, source: str) -> Any:
        """The one value ``query`` selects for the source of that name."""
        conn = psycopg2.connect(self.services()["DATABASE_URL"], connect_timeout=5)
        try:
            with conn.cursor() as cursor:
                cursor.execute(query, [source])
                (value,) = cursor.fetchone()
        finally:
            conn.close()
        return value

    def stored(self, source: str) -> int:
        """Rows in ``ingest_event`` for the source of that name."""
        return int(
            self._one(
                "SELECT count(*) FROM ingest_event e JOIN ingest_source s "
                "ON s.id = e.source_id WHERE s.name = %s",
                source,
            )
        )

    def team_of(self, source: str) -> str:
        """The slug of the team that owns the source of that name."""
        return str(
            self._one(
                "SELECT t.slug FROM ingest_source s JOIN teams_team t ON t.id = s.team_id "
                "WHERE s.name = %s",
                source,
            )
        )

    def worker_master(self, queue: str) -> psutil.Process | None:
        """The Celery master process consuming ``queue``."""
        for process in psutil.Process(self.process.pid).children(recursive=True):
            try:  # any of them may exit (or be a zombie) meanwhile
                command = process.cmdline()
                parent = process.parent()
                parent_command = parent.cmdline() if parent else []
            except psutil.Error:
                continue
            if (
                "worker" in command
                and queue in command
                and "supervisord" in " ".join(parent_command)
            ):
                return process
        return None


@pytest.fixture(scope="module")
def platform() -> Iterator[Platform]:
    run_dir = BASE_DIR / ".run" / "pytest" / f"platform-{uuid.uuid4().hex[:8]}"
    run_dir.mkdir(parents=True)
    log_path = run_dir / "make-run.log"
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "devtools.localservices", "run"),
                *("--run-dir", str(run_dir), "--", sys.executable, "-m", "devtools.run"),
            ],
            cwd=BASE_DIR,
            env=_shell_environment(PORT=str(port)),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    platform = Platform(process, run_dir, log_path, port)

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the platform ended ({process.returncode}):\n{platform.log()[-4000:]}")
        states = platform.states()
        return set(states) == PLATFORM_PROGRAMS and all(
            s["statename"] == "RUNNING" for s in states.values()
        )

    try:
        _wait_for(ready, 120, "every platform process RUNNING", poll_s=0.5)
        yield platform
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_a_taken_web_port_is_refused_before_anything_starts(run_dir: Path) -> None:
    """Another program listens on the web port: ``make run`` says so at once (naming
    the port and how to pick another) instead of a banner and a platform that gives up
    a minute later. Nothing is needed for that check: no database, no Redis."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "devtools.run"],
            check=False,
            cwd=BASE_DIR,
            env=_shell_environment(PORT=str(port), TWISCOPE_RUN_DIR=str(run_dir)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - started

    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use by another program" in result.stderr
    assert "pick another port: make run PORT=" in result.stderr
    assert "Twiscope is" not in result.stdout
    assert took < 30
    assert not (run_dir / "log").exists()


@pytest.mark.slow
def test_the_banner_comes_once_the_platform_answers_and_names_what_a_second_shell_uses(
    platform: Platform,
) -> None:
    """The banner of a real ``make run``: printed once the dashboard answers, with the
    demo login that opens it, and the ``supervisorctl`` line, typed in a new terminal,
    shows every process."""
    _wait_for(lambda: "Twiscope is running" in platform.log(), 60, "the banner")
    log = platform.log()
    banner = log[log.index("Twiscope is running") :].split("=" * 72)[0]
    # "  Label       value": the label in 11 columns after two spaces.
    rows = {line[2:13].strip(): line[14:] for line in banner.splitlines()[1:] if line.strip()}
    password = (platform.run_dir / "demo-password").read_text().strip()
    processes = rows["Processes"].split()

    status = platform.type_in_second_shell(processes, timeout=60)

    assert rows["Dashboard"] == f"http://127.0.0.1:{platform.port}/"
    assert _answers(platform.port)
    assert rows["Login"] == f"demo / {password}"
    assert processes[1] == "-c" and processes[3:] == ["status"]
    assert BASE_DIR / processes[2] == platform.run_dir / "supervisor" / "control.conf"
    assert status.returncode == 0, status.stdout + status.stderr
    assert {line.split()[0] for line in status.stdout.splitlines()} == {
        f"twiscope:{name}" for name in PLATFORM_PROGRAMS
    }
    assert {line.split()[1] for line in status.stdout.splitlines()} == {"RUNNING"}


@pytest.mark.slow
def test_the_readme_replay_command_works_in_a_second_shell(platform: Platform) -> None:
    """The README's ``.venv/bin/python manage.py replay PATH --speed max``, as typed in a
    new terminal: no ``DATABASE_URL``, ``REDIS_URL`` or ``SECRET_KEY``, only what a
    shell has, plus ``TWISCOPE_RUN_DIR``.

    Why that one variable: a plain ``make run`` writes ``.run/env`` and a plain shell
    reads ``.run/env`` (``tests/test_second_shell.py`` checks that default), so the
    README's command needs nothing. This test must not use the repository's ``.run``,
    which a developer's running platform owns (its lock, its data, its env file), so
    its platform lives in a private run dir and the shell is pointed at it the way a
    user of a non-default run dir would do it: ``TWISCOPE_RUN_DIR`` names the run dir
    in both ``make run`` (``localservices`` takes it as its default) and the shell.
    """
    archive = SAMPLES / "airline.csv"
    command = ".venv/bin/python manage.py replay tests/samples/airline.csv --speed max"

    result = platform.type_in_second_shell(command.split(), timeout=120)

    assert result.returncode == 0, result.stderr[-4000:]
    expected = _distinct_posts(archive)
    _wait_for(lambda: platform.stored("airline") == expected, 60, f"{expected} events stored")


@pytest.mark.slow
def test_with_a_second_team_the_readme_commands_still_work_as_typed(platform: Platform) -> None:
    """The README's ``create_user ... --create-team`` in a new terminal prints its own
    lines only (no log records around them), and then the README's replay, typed
    without ``--team``, still works: it goes to the demo team and says so."""
    python = ".venv/bin/python"
    created = platform.type_in_second_shell(
        [
            *(python, "manage.py", "create_user", "lead", "--team", "desk"),
            *("--create-team", "News desk", "--role", "owner"),
        ],
        timeout=120,
    )
    replayed = platform.type_in_second_shell(
        [python, "manage.py", "replay", "tests/samples/x_v1.jsonl", "--speed", "max"],
        timeout=120,
    )
    _wait_for(lambda: platform.stored("x_v1") == 4, 60, "the 4 posts stored")

    assert created.returncode == 0, created.stderr
    assert created.stderr == ""
    assert created.stdout.splitlines()[:3] == [
        'created team "News desk" (desk); it has no alert rules yet: add them in the admin '
        "(/admin/alerts/alertrule/) or through /api/rules/",
        "created user lead",
        'added lead to team "News desk" (desk) as owner',
    ]
    assert replayed.returncode == 0, replayed.stderr[-4000:]
    assert 'replay into team "Demo" (demo): the team make run creates' in replayed.stderr
    assert platform.team_of("x_v1") == "demo"


@pytest.mark.slow
def test_feeds_added_through_the_api_arrive_once_over_three_second_shell_polls(
    platform: Platform, shared_data: Path
) -> None:
    """Real feeds served on 127.0.0.1 (allowed under ``make run``), added with
    ``POST /api/sources/`` and polled three times by the README's ``manage.py
    run_sources --once`` typed in a new terminal, beside the platform's own ``sources``
    process: every item is stored exactly once."""
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    import feedparser
    import requests

    folder = shared_data / "rss_feeds"
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = (platform.run_dir / "api-token").read_text().strip()
    expected = {}
    try:
        for name in ("guardian.rss", "gulp-atom.atom", "rss-1.rss"):
            response = requests.post(
                f"http://127.0.0.1:{platform.port}/api/sources/",
                json={
                    "kind": "rss",
                    "name": f"feed {name}",
                    "config": {"url": f"http://127.0.0.1:{server.server_address[1]}/{name}"},
                },
                headers={"Authorization": f"Token {token}"},
                timeout=30,
            )
            assert response.status_code == 201, response.text
            entries = feedparser.parse((folder / name).read_bytes()).entries
            expected[f"feed {name}"] = len({e.get("id") or e.get("link") for e in entries})
        for _ in range(3):
            polled = platform.type_in_second_shell(
                [".venv/bin/python", "manage.py", "run_sources", "--once"], timeout=120
            )
            assert polled.returncode == 0, polled.stderr[-4000:]
        _wait_for(
            lambda: all(platform.stored(n) == count for n, count in expected.items()),
            60,
            f"every feed's items stored: {expected}",
        )
        time.sleep(2)
        assert {n: platform.stored(n) for n in expected} == expected
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_the_readme_train_and_evaluate_commands_work_in_a_second_shell(
    platform: Platform, tmp_path: Path
) -> None:
    """``manage.py train`` and ``evaluate`` as the README shows them, typed in a new
    terminal beside the running platform (a tiny generated data set in TweetEval's
    layout, the fast frozen method); the artefact lands in the platform's run dir."""
    data = tmp_path / "sentiment"
    data.mkdir()
    for split, per_label, offset in (("train", 12, 0), ("val", 4, 3), ("test", 4, 5)):
        write_generated_split(data, split, per_label, offset)
    python = ".venv/bin/python"

    train = platform.type_in_second_shell(
        [python, "manage.py", "train", "sentiment", "--data", str(data), "--method", "frozen"],
        timeout=300,
    )
    assert train.returncode == 0, train.stderr[-4000:]
    assert "active: it is the first model of this task" in train.stdout
    assert (platform.run_dir / "models" / "sentiment" / "v1" / "head.npz").is_file()

    out = tmp_path / "eval.json"
    evaluate = platform.type_in_second_shell(
        [
            *(python, "manage.py", "evaluate", "sentiment", "--data", str(data)),
            *("--split", "test", "--json", str(out)),
        ],
        timeout=300,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["model_version"] == "sentiment-minilm-logreg v1" and result["n"] == 12
    assert result["macro_recall"] >= 0.9


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_replay_stores_every_event_once(
    platform: Platform, shared_data: Path
) -> None:
    """SIGKILL to the ingest worker's Celery master during a full-speed replay.

    Its prefork child dies with it (Celery asks for that), and the messages it held
    stay unacknowledged (Redis redelivers them after an hour), so a batch it was
    persisting comes back only through the ingest sweeper (once its record is
    ``PIPELINE_STUCK_AFTER_S`` old, no longer refreshed by the dead worker's heartbeat;
    run every 15 s). Measured with the former 120 s bound and 30 s sweeps: about 50 s
    for the whole test when the kill lands between batches, about 150 s when it lands
    on one. Exactly once: the
    events table is unique on (source, external id), and the stored count is compared
    with the archive's distinct ids.
    """
    from django.conf import settings

    archive = shared_data / "airline_tweets" / "Tweets.csv"
    expected = _distinct_posts(archive)
    others = {name: s["pid"] for name, s in platform.states().items() if name != "worker-ingest"}
    replay = subprocess.Popen(
        [".venv/bin/python", "manage.py", "replay", str(archive), "--speed", "max"],
        cwd=BASE_DIR,
        env=platform.second_shell(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(lambda: platform.stored("Tweets") >= expected // 5, 90, "a fifth stored")
        master = platform.worker_master("ingest")
        assert master is not None and replay.poll() is None
        master.send_signal(signal.SIGKILL)
        restarted = _wait_for(
            lambda: (m := platform.worker_master("ingest")) is not None and m.pid != master.pid,
            30,
            "a new ingest worker",
        )
        output, _ = replay.communicate(timeout=300)
        _wait_for(
            lambda: platform.stored("Tweets") >= expected,
            settings.PIPELINE_STUCK_AFTER_S + 90,
            f"{expected} events stored",
            poll_s=1.0,
        )
    finally:
        if replay.poll() is None:
            replay.kill()
    # supervisord calls a restarted process RUNNING once it has stayed up for its
    # startsecs; the replay may finish before that.
    _wait_for(
        lambda: platform.states()["worker-ingest"]["statename"] == "RUNNING",
        30,
        "worker-ingest RUNNING",
    )
    states = platform.states()

    assert restarted
    assert replay.returncode == 0, output[-4000:]
    assert platform.stored("Tweets") == expected
    assert {name: states[name]["pid"] for name in others} == others
    assert "exited: worker-ingest (terminated by SIGKILL; not expected)" in platform.log()
    assert platform.process.poll() is None


@pytest.mark.slow
def test_sigterm_stops_every_process_and_the_services(platform: Platform) -> None:
    """Last of the platform tests: it stops the module's platform."""
    services = platform.services()
    ports = [urlsplit(services[key]).port for key in ("DATABASE_URL", "REDIS_URL")]
    descendants = [p.pid for p in psutil.Process(platform.process.pid).children(recursive=True)]

    os.kill(platform.process.pid, signal.SIGTERM)
    status = platform.process.wait(60)

    assert status == 128 + signal.SIGTERM, platform.log()[-4000:]
    assert len(descendants) > len(PLATFORM_PROGRAMS)
    assert _gone(descendants)
    assert all(port is not None and _port_closed(port) for port in ports)
    assert not (platform.run_dir / "env").exists()
