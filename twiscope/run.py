"""``make run``: prepare the database, say how to get in, start and supervise every process.

Usage (``make run`` wraps it in ``twiscope.localservices run``, which provides
``DATABASE_URL``, ``REDIS_URL``, a development ``SECRET_KEY`` and ``TWISCOPE_RUN_DIR``)::

    python -m twiscope.run [--skip-bootstrap] [--procfile PATH]

Steps, each in a child process with this environment:

1. ``manage.py migrate --noinput``; ``manage.py collectstatic --noinput`` (quiet);
2. ``manage.py bootstrap_demo`` (unless ``--skip-bootstrap``): creates the demo user
   and API token, prints ``{"username", "password", "token"}`` as JSON on its last
   stdout line and writes the token to ``<run-dir>/api-token``;
3. a banner on stdout: dashboard URL, demo login, API token and its file, API docs,
   where the logs are;
4. the ``Procfile``'s processes (web, one Celery worker per queue, beat), plus a
   ``replay`` process when ``REPLAY`` is set, under supervisord (the ``supervisor``
   package) in the foreground. Its configuration is generated from the Procfile at each
   start: ``<run-dir>/supervisor/supervisord.conf``.

Supervision (supervisord's own rules, with the values below): a process that exits is
restarted at once; one that exits within ``START_SECONDS`` of being started counts as
a failed start and is retried after 1, 2, 3, ... seconds; after ``START_RETRIES``
failed starts in a row supervisord gives up on it (state ``FATAL``), and then this
runner stops the platform (exit status 1: a process that cannot run at all, such as a
web port already taken, is an error to fix, not a platform to keep half up). Every
exit and restart is logged (``exited: worker-ingest (terminated by SIGKILL; not
expected)``, ``spawned: 'worker-ingest' with pid 1234``). The replay runs once: it is
never restarted and its end, successful or not, never stops the platform. Each
process runs as ``/bin/sh -c 'exec COMMAND'`` in the repository, in its own process
group (so a Procfile line is one command; a script for more).

Output: each process's stdout and stderr go to ``<run-dir>/log/<name>.log`` (rotated at
10 MB) and are relayed to our stdout, each line prefixed with the process's name;
supervisord's own log (``<run-dir>/log/supervisord.log``) as ``supervisor``. Another
shell can see and drive the processes with ``.venv/bin/supervisorctl -c
<run-dir>/supervisor/supervisord.conf status`` (or ``restart twiscope:worker-enrich``).

Environment: ``PORT`` (web port, default 8000); ``REPLAY`` (a path handed to
``manage.py replay``) and ``SPEED`` (its ``--speed``, default ``max``);
``TWISCOPE_RUN_DIR`` (default: the repository's ``.run``).

Stopping: Ctrl-C (or SIGTERM) makes supervisord send SIGTERM to every process's group
at once (Celery's prefork children go too) and SIGKILL to a group still there after
``STOP_WAIT_SECONDS``; then it exits. Should supervisord itself die, the process groups
it had started are stopped here; should this runner die, supervisord is sent SIGTERM
(Linux's parent-death signal). The exit status: 130 after SIGINT, 143 after SIGTERM;
1 when a preparation step fails, when supervisord gives up on a process, or when
supervisord ends on its own.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import hashlib
import http.client
import json
import logging
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO, TextIO, cast

from honcho.environ import parse_procfile

from twiscope.localservices import DEFAULT_RUN_DIRS, run_dir_for

logger = logging.getLogger("twiscope.run")

BASE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_RUN_DIR = DEFAULT_RUN_DIRS["run"]
DEFAULT_PROCFILE = BASE_DIR / "Procfile"
DEFAULT_PORT = "8000"
SUPERVISORCTL = Path(sys.executable).parent / "supervisorctl"

# A process that dies sooner than this after its start has failed to start (backoff);
# Celery and Daphne need a few seconds to import the project before they can fail.
START_SECONDS = 10
START_RETRIES = 5
STOP_WAIT_SECONDS = 10
LOG_MAX_BYTES = "10MB"
POLL_S = 0.5
RELAY_POLL_S = 0.1
# AF_UNIX paths longer than this do not fit in sockaddr_un (108 bytes with the NUL).
MAX_SOCKET_PATH = 100
SUPERVISOR_GROUP = "twiscope"
SUPERVISOR_LABEL = "supervisor"
SUPERVISOR_USER = "twiscope"
PR_SET_PDEATHSIG = 1

REPLAY_NAME = "replay"
# The replay's end, successful or not, is reported and leaves the platform running.
REPLAY_COMMAND = (
    '{python} manage.py replay "$REPLAY" --speed "${{SPEED:-max}}" --wait 3600; status=$?; '
    'echo "replay: finished (exit $status); the platform keeps running, Ctrl-C stops it"; '
    "exit $status"
)


class RunError(RuntimeError):
    """A preparation step failed, or a Procfile command cannot be handed to supervisord;
    the message says which."""


@dataclass(frozen=True)
class DemoLogin:
    """What ``bootstrap_demo`` reports: the demo user's login and API token."""

    username: str
    password: str
    token: str


@dataclass(frozen=True)
class Program:
    """One supervised process: its name, its shell command line, and whether it runs
    once (never restarted, its end never stops the platform)."""

    name: str
    command: str
    one_shot: bool = False

    @property
    def shell_command(self) -> str:
        """What ``/bin/sh -c`` runs. A long-running process replaces the shell
        (``exec``), so supervisord watches and signals the program itself: a shell in
        between would exit at the first SIGTERM while the program is still shutting
        down. A Procfile line must therefore be one command (a script for more)."""
        return self.command if self.one_shot else f"exec {self.command}"


@dataclass(frozen=True)
class SupervisorFiles:
    """Where supervisord's files of one run dir live."""

    run_dir: Path

    @property
    def config(self) -> Path:
        return self.run_dir / "supervisor" / "supervisord.conf"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "supervisor" / "supervisord.pid"

    @property
    def socket(self) -> Path:
        """The control socket: in the run dir, or in a temporary directory when that
        path would be too long for a Unix socket (a deep checkout)."""
        path = self.run_dir / "supervisor" / "supervisord.sock"
        if len(str(path)) <= MAX_SOCKET_PATH:
            return path
        return Path(tempfile.gettempdir()) / f"twiscope-{os.getuid()}-{_short_hash(path)}.sock"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "log"

    def log(self, name: str) -> Path:
        """``<run-dir>/log/<name>.log``; ``supervisord.log`` for supervisord itself."""
        return self.log_dir / f"{name}.log"


def _short_hash(path: Path) -> str:
    return hashlib.sha256(str(path).encode()).hexdigest()[:12]


def process_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment every child gets: ``environ`` with this interpreter's bin
    directory first on ``PATH`` (so ``celery``/``daphne`` in the Procfile are the
    virtualenv's even when it is not activated), ``PORT`` defaulted and Python's
    output unbuffered (so log lines are relayed as they happen)."""
    env = dict(environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", os.defpath)])
    env["PORT"] = env.get("PORT") or DEFAULT_PORT
    env["PYTHONUNBUFFERED"] = "1"
    return env


def manage(args: Sequence[str], env: Mapping[str, str], *, capture: bool = False) -> str:
    """Run ``manage.py ARGS`` in the repository; return its stdout when ``capture``.

    stderr always goes to ours. Raises ``RunError`` naming the command when it fails.
    """
    command = [sys.executable, "manage.py", *args]
    result = subprocess.run(
        command,
        check=False,
        cwd=BASE_DIR,
        env=dict(env),
        stdout=subprocess.PIPE if capture else None,
        text=True,
    )
    if result.returncode != 0:
        raise RunError(f"manage.py {' '.join(args)} failed with exit status {result.returncode}")
    return result.stdout or ""


def parse_bootstrap_output(stdout: str) -> DemoLogin:
    """The ``DemoLogin`` in ``bootstrap_demo``'s last non-empty stdout line.

    Raises ``RunError`` when that line is missing, not a JSON object, or lacks one of
    ``username``, ``password``, ``token`` (strings).
    """
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise RunError("manage.py bootstrap_demo printed nothing; expected a JSON line")
    try:
        data = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise RunError(
            f"manage.py bootstrap_demo's last line is not JSON: {lines[-1][:200]!r}"
        ) from exc
    fields = ("username", "password", "token")
    if not isinstance(data, dict) or not all(isinstance(data.get(f), str) for f in fields):
        raise RunError(
            f"manage.py bootstrap_demo's JSON must have string fields {', '.join(fields)}"
        )
    return DemoLogin(username=data["username"], password=data["password"], token=data["token"])


def prepare(env: Mapping[str, str], *, bootstrap: bool, run_dir: Path) -> DemoLogin | None:
    """Migrate, collect static files and (when ``bootstrap``) create the demo login.

    Side effects: schema changes in the database, files in ``STATIC_ROOT``, the demo
    user and token (and ``<run_dir>/api-token``). Raises ``RunError`` on a failed step.
    """
    manage(["migrate", "--noinput"], env)
    manage(["collectstatic", "--noinput", "--verbosity", "0"], env)
    if not bootstrap:
        return None
    stdout = manage(["bootstrap_demo", "--run-dir", str(run_dir)], env, capture=True)
    # Its other output (if any) is for the user; the last line is for us.
    for line in stdout.splitlines()[:-1]:
        print(line)
    return parse_bootstrap_output(stdout)


def banner(
    port: str,
    demo: DemoLogin | None,
    replay: str | None,
    speed: str,
    run_dir: Path = DEFAULT_RUN_DIR,
) -> str:
    """The lines that tell a user where everything is (plain text, no colours)."""
    base = f"http://127.0.0.1:{port}"
    files = SupervisorFiles(run_dir)
    rows = [("Dashboard", f"{base}/")]
    if demo is None:
        rows.append(("Login", "(demo bootstrap skipped)"))
    else:
        rows += [
            ("Login", f"{demo.username} / {demo.password}"),
            ("API token", demo.token),
            ("Token file", _short(run_dir / "api-token")),
        ]
    rows.append(("API docs", f"{base}/api/docs/"))
    if replay:
        rows.append(("Replay", f"{replay} at speed {speed}"))
    rows += [
        ("Logs", _short(files.log_dir / "<process>.log")),
        ("Processes", f"{_short(SUPERVISORCTL)} -c {_short(files.config)} status"),
        ("Stop", "Ctrl-C"),
    ]
    rule = "=" * 72
    body = [f"  {label:<11} {value}" for label, value in rows]
    return "\n".join([rule, "  Twiscope is starting", *body, rule])


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(BASE_DIR))
    except ValueError:
        return str(path)


# --- The supervisord configuration -------------------------------------------------------


def programs_from(procfile: Path, *, replay: bool) -> list[Program]:
    """Every Procfile process, plus the one-shot ``replay`` when asked.

    Raises ``RunError`` when the Procfile lists nothing.
    """
    processes = parse_procfile(procfile.read_text()).processes
    if not processes:
        raise RunError(f"{procfile} lists no processes")
    programs = [Program(name, command) for name, command in processes.items()]
    if replay:
        python = shlex.quote(sys.executable)
        programs.append(Program(REPLAY_NAME, REPLAY_COMMAND.format(python=python), True))
    return programs


def _value(text: str) -> str:
    """``text`` as a supervisord configuration value.

    supervisord expands ``%(name)s`` in values (so ``%`` is doubled) and its parser
    ends a value at whitespace followed by ``;`` or ``#`` (an inline comment), which
    has no escape: such a value is refused with ``RunError``, as is a line break.
    """
    if "\n" in text or re.search(r"\s[;#]", text):
        raise RunError(
            f"cannot hand {text[:80]!r} to supervisord: a line break, or ';' or '#' after "
            "a space, would be cut off there; move the command into a script"
        )
    return text.replace("%", "%%")


def supervisord_config(
    programs: Sequence[Program], files: SupervisorFiles, *, password: str, as_root: bool
) -> str:
    """The text of ``supervisord.conf`` for ``programs`` (see the module docstring).

    Every program runs as ``/bin/sh -c`` ``Program.shell_command`` in the repository,
    with supervisord's environment (ours), its output in its own log file; all of them
    form one group so that a stop signals every process at once (supervisord stops
    groups one by one). The control socket (mode 0700) asks for user ``twiscope`` and
    ``password``, which the ``[supervisorctl]`` section holds, so the file must be
    written private (0600). ``as_root``: say ``user=root``, which supervisord asks for
    to run as root without a warning. Raises ``RunError`` for a command supervisord
    could not be given.
    """
    lines = [
        "; Generated by twiscope/run.py from the Procfile at each start: edit that instead.",
        "[supervisord]",
        "nodaemon=true",
        # twiscope.run relays the log file to the terminal, with a prefix.
        "silent=true",
        f"logfile={_value(str(files.log('supervisord')))}",
        f"logfile_maxbytes={LOG_MAX_BYTES}",
        "logfile_backups=1",
        f"pidfile={_value(str(files.pidfile))}",
        f"childlogdir={_value(str(files.log_dir))}",
        f"identifier={SUPERVISOR_GROUP}",
        *(["user=root"] if as_root else []),
        "",
        "[unix_http_server]",
        f"file={_value(str(files.socket))}",
        "chmod=0700",
        f"username={SUPERVISOR_USER}",
        f"password={password}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{_value(str(files.socket))}",
        f"username={SUPERVISOR_USER}",
        f"password={password}",
        "",
        f"[group:{SUPERVISOR_GROUP}]",
        f"programs={','.join(program.name for program in programs)}",
    ]
    for program in programs:
        lines += [
            "",
            f"[program:{program.name}]",
            f"command={_value(shlex.join(['/bin/sh', '-c', program.shell_command]))}",
            f"directory={_value(str(BASE_DIR))}",
            "autostart=true",
            f"autorestart={'false' if program.one_shot else 'true'}",
            f"startsecs={0 if program.one_shot else START_SECONDS}",
            f"startretries={START_RETRIES}",
            "exitcodes=0",
            "stopsignal=TERM",
            f"stopwaitsecs={STOP_WAIT_SECONDS}",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={_value(str(files.log(program.name)))}",
            f"stdout_logfile_maxbytes={LOG_MAX_BYTES}",
            "stdout_logfile_backups=1",
        ]
    return "\n".join(lines) + "\n"


# --- Relaying the log files ----------------------------------------------------------------


class _Tail:
    """New complete lines of one log file, across supervisord's rotations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: BinaryIO | None = None
        self._inode: int | None = None
        self._partial = b""

    def skip_existing(self) -> None:
        """Start at the end of the file as it is now (an earlier run's lines)."""
        if self._open():
            assert self._fh is not None
            self._fh.seek(0, os.SEEK_END)

    def lines(self, *, final: bool = False) -> list[bytes]:
        """The lines written since the last call; ``final``: with an unfinished last one."""
        if self._fh is None and not self._open():
            return []
        assert self._fh is not None
        data = self._fh.read()
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        if current is not None and current.st_ino != self._inode:
            # Rotated: the old file is complete, the new one starts from its beginning.
            data += self._fh.read()
            self._fh.close()
            self._fh = None
            if self._open():
                data += self._read()
        elif current is not None and current.st_size < self._fh.tell():
            self._fh.seek(0)
            data += self._fh.read()
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        if final and self._partial:
            chunks.append(self._partial)
            self._partial = b""
        return chunks

    def _read(self) -> bytes:
        return self._fh.read() if self._fh is not None else b""

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _open(self) -> bool:
        try:
            self._fh = self.path.open("rb")
        except FileNotFoundError:
            return False
        self._inode = os.fstat(self._fh.fileno()).st_ino
        return True


class LogRelay:
    """Copies new lines of several log files to ``out``, each prefixed with its label
    (``web            | ...``), every ``RELAY_POLL_S`` seconds, in a thread."""

    def __init__(self, sources: Mapping[str, Path], out: TextIO) -> None:
        """Sets the start of each file at its current end (an earlier run's lines are
        not shown again); nothing is copied before ``start()``."""
        self._tails = {label: _Tail(path) for label, path in sources.items()}
        for tail in self._tails.values():
            tail.skip_existing()
        self._width = max(len(label) for label in sources)
        self._out = out
        self._reader_gone = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-relay", daemon=True)

    def start(self) -> None:
        """Follow the files, in a thread."""
        self._thread.start()

    def stop(self) -> None:
        """Copy what is left (unfinished last lines too) and stop following."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._copy(final=True)
        for tail in self._tails.values():
            tail.close()

    def _run(self) -> None:
        while not self._stop.wait(RELAY_POLL_S):
            self._copy()

    def _copy(self, *, final: bool = False) -> None:
        lines = [
            f"{label:<{self._width}} | {line.decode('utf-8', 'replace').rstrip(chr(13))}\n"
            for label, tail in self._tails.items()
            for line in tail.lines(final=final)
        ]
        if not lines or self._reader_gone:
            return
        try:
            self._out.write("".join(lines))
            self._out.flush()
        except BrokenPipeError:
            # Nobody reads our output any more (a closed pipe): the log files keep it all.
            self._reader_gone = True


# --- Running supervisord ------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    """XML-RPC over supervisord's Unix socket, with HTTP basic authentication and a
    timeout (a hung supervisord must not hang the runner)."""

    def __init__(self, path: Path, password: str, timeout: float = 5.0) -> None:
        super().__init__()
        self._path = str(path)
        self._timeout = timeout
        credentials = base64.b64encode(f"{SUPERVISOR_USER}:{password}".encode()).decode()
        self._authorization = ("Authorization", f"Basic {credentials}")

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        return _UnixHTTPConnection(self._path, self._timeout)

    def send_headers(self, connection: http.client.HTTPConnection, headers: Any) -> None:
        super().send_headers(connection, [*headers, self._authorization])


def process_states(socket_path: Path, password: str) -> list[dict[str, Any]]:
    """supervisord's ``getAllProcessInfo()``: one dict per process (``name``,
    ``statename``, ``pid``, ...). Raises ``OSError`` / ``xmlrpc.client.Error`` when
    supervisord does not answer (yet)."""
    proxy = xmlrpc.client.ServerProxy(
        "http://localhost", transport=_UnixTransport(socket_path, password)
    )
    return cast("list[dict[str, Any]]", proxy.supervisor.getAllProcessInfo())


def _parent_death_signal() -> Callable[[], None] | None:
    """Where Linux's ``prctl`` is available, a ``preexec_fn`` that asks for SIGTERM when
    this runner dies. ``prctl`` is looked up here, in the parent: the child only calls
    it (and supervisord is started before the log relay's thread)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def request_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return request_signal


class _Stop:
    """SIGINT/SIGTERM handling while supervisord runs: the first signal asks supervisord
    to stop (SIGTERM; at once, or as soon as it is attached), later ones only say that
    it is stopping."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._supervisord: subprocess.Popen[bytes] | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            logger.info("run: %s received; stopping already", signal.Signals(signum).name)
            return
        self.signum = signum
        logger.info("run: %s received, stopping every process", signal.Signals(signum).name)
        self.request()

    def attach(self, supervisord: subprocess.Popen[bytes]) -> None:
        self._supervisord = supervisord
        if self.signum is not None:
            self.request()

    def request(self) -> None:
        if self._supervisord is not None and self._supervisord.poll() is None:
            self._supervisord.send_signal(signal.SIGTERM)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def supervise(
    programs: Sequence[Program],
    env: Mapping[str, str],
    files: SupervisorFiles,
    *,
    out: TextIO | None = None,
) -> int:
    """Run ``programs`` under supervisord until a signal, a ``FATAL`` process or the
    end of supervisord; return the exit status (see the module docstring).

    Side effects: writes ``files``' configuration (mode 0600, a new control password
    each time) and logs; relays the logs to ``out`` (default: stdout); on return no
    process it started is left. Raises ``RunError`` for a command supervisord could
    not be given (before starting anything).
    """
    password = secrets.token_urlsafe(24)
    config = supervisord_config(programs, files, password=password, as_root=os.geteuid() == 0)
    for directory in (files.config.parent, files.log_dir):
        directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(files.config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(config)
    sources = {SUPERVISOR_LABEL: files.log("supervisord")}
    sources.update({program.name: files.log(program.name) for program in programs})
    relay = LogRelay(sources, out or sys.stdout)
    stop = _Stop()
    one_shot = {program.name for program in programs if program.one_shot}
    pids: dict[str, int] = {}
    failed: str | None = None
    with stop.installed():
        supervisord = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(files.config)],
            cwd=BASE_DIR,
            env=dict(env),
            start_new_session=True,
            preexec_fn=_parent_death_signal(),
        )
        relay.start()
        stop.attach(supervisord)
        try:
            while supervisord.poll() is None:
                if stop.signum is None and failed is None:
                    failed = _watch(files.socket, password, one_shot, pids)
                    if failed is not None:
                        logger.error(
                            "run: supervisord gave up on %s (it kept exiting within %s s "
                            "of its start; see %s); stopping the platform",
                            failed,
                            START_SECONDS,
                            _short(files.log(failed)),
                        )
                        stop.request()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    supervisord.wait(POLL_S)
        finally:
            if supervisord.poll() is None:
                stop.request()
                _wait_or_kill(supervisord, STOP_WAIT_SECONDS + 20)
            _stop_leftovers(pids)
            relay.stop()
            if files.socket.parent != files.config.parent:
                with contextlib.suppress(FileNotFoundError):
                    files.socket.unlink()
    if stop.signum is not None:
        return 128 + stop.signum
    if failed is None:
        logger.error("run: supervisord ended on its own (exit %s)", supervisord.returncode)
    return 1


def _watch(
    socket_path: Path, password: str, one_shot: set[str], pids: dict[str, int]
) -> str | None:
    """Record each process's pid; return the name of one supervisord gave up on
    (``FATAL``), one-shot ones aside, or ``None``."""
    try:
        states = process_states(socket_path, password)
    except (OSError, xmlrpc.client.Error):
        return None  # not listening yet, or busy: asked again at the next poll
    for state in states:
        if state.get("pid"):
            pids[state["name"]] = state["pid"]
    fatal = [s["name"] for s in states if s["statename"] == "FATAL" and s["name"] not in one_shot]
    return fatal[0] if fatal else None


def _wait_or_kill(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("run: supervisord did not stop within %s s, killing it", timeout_s)
        process.kill()
        process.wait()


def _stop_leftovers(pids: Mapping[str, int]) -> None:
    """SIGTERM, then SIGKILL after ``STOP_WAIT_SECONDS``, the process groups of
    ``pids`` that still exist (only when supervisord could not stop them itself)."""
    alive = [name for name, pid in pids.items() if _group_exists(pid)]
    if not alive:
        return
    logger.warning("run: stopping what supervisord left running: %s", ", ".join(alive))
    for name in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pids[name], signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    while time.monotonic() < deadline and any(_group_exists(pids[n]) for n in alive):
        time.sleep(0.1)
    for name in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pids[name], signal.SIGKILL)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m twiscope.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--skip-bootstrap",
        action="store_true",
        help="do not run manage.py bootstrap_demo",
    )
    parser.add_argument("--procfile", type=Path, default=DEFAULT_PROCFILE)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    env = process_environment(os.environ)
    replay = env.get("REPLAY") or None
    speed = env.get("SPEED") or "max"
    run_dir = run_dir_for("run", env)
    run_dir.mkdir(parents=True, exist_ok=True)
    files = SupervisorFiles(run_dir)
    try:
        programs = programs_from(options.procfile, replay=bool(replay))
        # Refuse a command supervisord could not be given before the slow steps.
        supervisord_config(programs, files, password="check", as_root=False)
        demo = prepare(env, bootstrap=not options.skip_bootstrap, run_dir=run_dir)
    except RunError as exc:
        logger.error("run: %s", exc)
        return 1
    except KeyboardInterrupt:
        logger.info("run: interrupted before the processes started")
        return 130
    print(banner(env["PORT"], demo, replay, speed, run_dir), flush=True)
    return supervise(programs, env, files)


if __name__ == "__main__":
    sys.exit(main())
