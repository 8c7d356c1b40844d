"""supervisord around ``devtools/supervisord.conf``: start it, relay its logs, watch it,
stop it.

The process list is the static ``devtools/supervisord.conf`` (and, for a replay, the
static ``devtools/supervisord-replay.conf``, which it then includes); what changes from
one start to the next reaches it through the environment (``%(ENV_NAME)s``, see that
file) and one small file written here at each start, also included,
``<run-dir>/supervisor/control.conf`` (mode 0600): the control socket, a new password
for it, and, when running as root, ``user=root`` (which supervisord asks for to run as
root without a warning). The same file is what ``supervisorctl -c`` reads in another
terminal.

Supervision (supervisord's own rules, with the values of the config file): a process
that exits is restarted at once; one that exits within ``START_SECONDS`` of being
started counts as a failed start and is retried after 1, 2, 3, ... seconds; after 5
failed starts in a row supervisord gives up on it (state ``FATAL``), and then
``supervise()`` stops the platform (exit status 1: a process that cannot run at all,
such as a web port already taken, is an error to fix, not a platform to keep half up),
unless a dependency explains it: when PostgreSQL or Redis (the ``DATABASE_URL`` and
``REDIS_URL`` of the environment) did not accept a TCP connection at some poll in the
last ``DEPENDENCY_GRACE_S`` seconds, the program is left ``FATAL`` with a log line and
started again (``supervisor.startProcess``) once every dependency has accepted
connections for ``DEPENDENCY_SETTLE_S`` seconds. The programs themselves wait for a
dependency that is down (Celery's broker retries, ``run_sources``' backoff), so this
is the rule of last resort: a dependency's outage, however long, never stops the
platform; a program that fails with every dependency up still does.
Every exit and restart is logged (``exited: worker-ingest (terminated by SIGKILL; not
expected)``, ``spawned: 'worker-ingest' with pid 1234``). A one-shot program (the
replay: ``autorestart=false``) is never restarted and its end never stops the platform.

Stopping: SIGINT or SIGTERM makes supervisord send SIGTERM to every process's group at
once (Celery's prefork children go too) and SIGKILL to a group still there after
``STOP_WAIT_SECONDS``; then it exits. Should supervisord itself die, the process groups
it had started are stopped here; should this process die, supervisord is sent SIGTERM
(Linux's parent-death signal).
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import ctypes
import hashlib
import http.client
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, cast
from urllib.parse import urlsplit

from devtools.base import BASE_DIR, port_open, short_path
from devtools.logrelay import LogRelay

logger = logging.getLogger(__name__)

CONFIG = Path(__file__).resolve().parent / "supervisord.conf"
REPLAY_CONFIG = CONFIG.parent / "supervisord-replay.conf"
# As in supervisord.conf: startsecs and stopwaitsecs of every long-running program.
START_SECONDS = 10
STOP_WAIT_SECONDS = 10
POLL_S = 0.5
# AF_UNIX paths longer than this do not fit in sockaddr_un (108 bytes with the NUL).
MAX_SOCKET_PATH = 100
SUPERVISOR_GROUP = "twiscope"
SUPERVISOR_LABEL = "supervisor"
SUPERVISOR_USER = "twiscope"
PR_SET_PDEATHSIG = 1
REPLAY_NAME = "replay"
# How long the web server may take to answer before a line says where to look.
SLOW_ANNOUNCEMENT_S = 60.0
# A FATAL this soon after a dependency was seen down is blamed on it, not the program.
DEPENDENCY_GRACE_S = 120.0
# How long every dependency must answer before a program it stopped is started again.
DEPENDENCY_SETTLE_S = 3.0


class SuperviseError(RuntimeError):
    """supervisord could not be given its configuration; the message says why."""


@dataclass(frozen=True)
class Program:
    """One program of the config file: its name, and whether it runs once
    (``autorestart=false``: never restarted, its end never stops the platform)."""

    name: str
    one_shot: bool = False


@dataclass(frozen=True)
class Announcement:
    """What to tell the user once the platform is up: ``text``, as soon as ``url``
    answers HTTP (any status) while ``program`` is running under supervisord."""

    url: str
    text: str
    program: str = "web"


@dataclass(frozen=True)
class SupervisorFiles:
    """Where supervisord's files of one run dir live."""

    run_dir: Path

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "supervisor" / "supervisord.pid"

    @property
    def control(self) -> Path:
        """The per-start control file (socket, password): in the run dir, or in a
        temporary directory when the run dir's path has a space (supervisord's
        ``[include] files`` is a space-separated list)."""
        path = self.run_dir / "supervisor" / "control.conf"
        if not any(character.isspace() for character in str(path)):
            return path
        return self._private_temp / "control.conf"

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

    @property
    def _private_temp(self) -> Path:
        return Path(tempfile.gettempdir()) / f"twiscope-{os.getuid()}-{_short_hash(self.run_dir)}"


def _short_hash(path: Path) -> str:
    return hashlib.sha256(str(path).encode()).hexdigest()[:12]


def programs(config: Path = CONFIG, includes: Sequence[Path] = ()) -> list[Program]:
    """The programs of ``config`` and the static files it will include, those of its
    group first, in the group's order, then the others in file order.

    Read with ``configparser`` as written (no ``%(...)s`` expansion: only names and
    ``autorestart`` matter here). Raises ``SuperviseError`` when a file cannot be read
    or none lists a program.
    """
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"))
    for path in (config, *includes):
        if not parser.read(path):
            raise SuperviseError(f"cannot read {path}")
    names = [section.split(":", 1)[1] for section in parser if section.startswith("program:")]
    if not names:
        raise SuperviseError(f"{config} lists no programs")
    group = f"group:{SUPERVISOR_GROUP}"
    if parser.has_option(group, "programs"):
        listed = [name.strip() for name in parser[group]["programs"].split(",")]
        names = [name for name in listed if name in names] + [
            name for name in names if name not in listed
        ]
    return [
        Program(name, parser[f"program:{name}"].get("autorestart", "true").lower() == "false")
        for name in names
    ]


def control_config(files: SupervisorFiles, *, password: str, as_root: bool) -> str:
    """The text of ``files.control``: the control socket (mode 0700), asking for user
    ``twiscope`` and ``password``, which the ``[supervisorctl]`` section holds, so the
    file must be written private (0600); with ``as_root``, ``user=root``."""
    for value in (str(files.socket), password):
        if "\n" in value or "%" in value:
            raise SuperviseError(f"cannot hand {value!r} to supervisord")
    lines = [
        "; Written by devtools/supervise.py at each start of devtools/supervisord.conf;",
        "; for `supervisorctl -c` in another terminal.",
        *(["[supervisord]", "user=root", ""] if as_root else []),
        "[unix_http_server]",
        f"file={files.socket}",
        "chmod=0700",
        f"username={SUPERVISOR_USER}",
        f"password={password}",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{files.socket}",
        f"username={SUPERVISOR_USER}",
        f"password={password}",
    ]
    return "\n".join(lines) + "\n"


def supervisord_environment(
    env: Mapping[str, str],
    files: SupervisorFiles,
    *,
    config: Path = CONFIG,
    includes: Sequence[Path] = (),
) -> dict[str, str]:
    """``env`` plus what ``devtools/supervisord.conf`` reads: ``TWISCOPE_RUN_DIR`` and
    ``TWISCOPE_SUPERVISOR_INCLUDE`` (the control file, then ``includes``, which must sit
    in ``config``'s folder or below it: supervisord's list is space-separated, and a
    path relative to that folder holds no space of the checkout's path).

    Raises ``SuperviseError`` for an include elsewhere or with a space in its name.
    """
    names = []
    for include in includes:
        name = os.path.relpath(include, config.parent)
        if name.startswith("..") or any(character.isspace() for character in name):
            raise SuperviseError(f"cannot have supervisord include {include}")
        names.append(name)
    return {
        **env,
        "TWISCOPE_RUN_DIR": str(files.run_dir),
        "TWISCOPE_SUPERVISOR_INCLUDE": " ".join([str(files.control), *names]),
    }


# --- Talking to supervisord ------------------------------------------------------------------


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


def start_process(socket_path: Path, password: str, name: str) -> None:
    """supervisord's ``startProcess(<group>:<name>, wait=False)``. Raises ``OSError`` /
    ``xmlrpc.client.Error`` when supervisord does not answer or refuses."""
    proxy = xmlrpc.client.ServerProxy(
        "http://localhost", transport=_UnixTransport(socket_path, password)
    )
    proxy.supervisor.startProcess(f"{SUPERVISOR_GROUP}:{name}", False)


class Dependencies:
    """Whether PostgreSQL and Redis accept TCP connections, and when each last did not.

    ``addresses``: ``{name: (host, port)}``, from ``dependency_addresses(env)``.
    ``clock``: seconds, monotonic (a parameter for tests).
    """

    def __init__(
        self,
        addresses: Mapping[str, tuple[str, int]],
        clock: Callable[[], float] = time.monotonic,
        probe: Callable[[str, int], bool] = port_open,
    ) -> None:
        self._addresses = dict(addresses)
        self._clock = clock
        self._probe = probe
        self._last_down: dict[str, float] = {}
        self._down_now: set[str] = set()

    def check(self) -> None:
        """Probe each dependency once; log a line when one goes down or comes back."""
        now = self._clock()
        for name, (host, port) in self._addresses.items():
            if self._probe(host, port):
                if name in self._down_now:
                    self._down_now.discard(name)
                    logger.info("run: %s answers again", name)
                continue
            if name not in self._down_now:
                logger.warning("run: %s does not answer on %s:%s", name, host, port)
            self._down_now.add(name)
            self._last_down[name] = now

    def recently_down(self, within_s: float = DEPENDENCY_GRACE_S) -> list[str]:
        """The dependencies seen down in the last ``within_s`` seconds."""
        now = self._clock()
        return sorted(n for n, when in self._last_down.items() if now - when <= within_s)

    def settled(self, for_s: float = DEPENDENCY_SETTLE_S) -> bool:
        """Whether every dependency has answered at every check of the last ``for_s``."""
        now = self._clock()
        return not self._down_now and all(now - w >= for_s for w in self._last_down.values())


def dependency_addresses(env: Mapping[str, str]) -> dict[str, tuple[str, int]]:
    """``{"postgres": (host, port), "redis": (host, port)}`` from ``DATABASE_URL`` and
    ``REDIS_URL`` in ``env`` (default ports 5432 and 6379); a URL that is unset or has
    no host (a Unix socket) is left out."""
    found = {}
    for name, key, default in (
        ("postgres", "DATABASE_URL", 5432),
        ("redis", "REDIS_URL", 6379),
    ):
        parts = urlsplit(env.get(key) or "")
        if parts.hostname:
            found[name] = (parts.hostname, parts.port or default)
    return found


def process_states(socket_path: Path, password: str) -> list[dict[str, Any]]:
    """supervisord's ``getAllProcessInfo()``: one dict per process (``name``,
    ``statename``, ``pid``, ...). Raises ``OSError`` / ``xmlrpc.client.Error`` when
    supervisord does not answer (yet)."""
    proxy = xmlrpc.client.ServerProxy(
        "http://localhost", transport=_UnixTransport(socket_path, password)
    )
    return cast("list[dict[str, Any]]", proxy.supervisor.getAllProcessInfo())


def answers_http(url: str, timeout_s: float = 1.0) -> bool:
    """Whether an HTTP server answers ``GET url`` (``http://host:port/path``) with any
    status within ``timeout_s``; redirects are not followed. Never raises."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    connection = http.client.HTTPConnection(host, int(port or 80), timeout=timeout_s)
    try:
        connection.request("GET", f"/{path}")
        connection.getresponse().read()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()
    return True


# --- Running supervisord ------------------------------------------------------------------


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


class _Announcer:
    """Announces once: when the program is running and its URL answers."""

    def __init__(self, announcement: Announcement | None, relay: LogRelay) -> None:
        self._announcement = announcement
        self._relay = relay
        self._started = time.monotonic()
        self._slow_said = False

    def check(self, states: list[dict[str, Any]], files: SupervisorFiles) -> None:
        announcement = self._announcement
        if announcement is None:
            return
        running = any(
            s["name"] == announcement.program and s["statename"] in ("STARTING", "RUNNING")
            for s in states
        )
        if running and answers_http(announcement.url):
            self._relay.announce(announcement.text)
            self._announcement = None
        elif not self._slow_said and time.monotonic() - self._started > SLOW_ANNOUNCEMENT_S:
            self._slow_said = True
            logger.warning(
                "run: %s has not answered for %.0f s; see %s",
                announcement.url,
                SLOW_ANNOUNCEMENT_S,
                short_path(files.log(announcement.program)),
            )


def supervise(
    env: Mapping[str, str],
    files: SupervisorFiles,
    *,
    config: Path = CONFIG,
    includes: Sequence[Path] = (),
    announcement: Announcement | None = None,
    out: TextIO | None = None,
) -> int:
    """Run the programs of ``config`` (and of the static files ``includes``, such as
    ``REPLAY_CONFIG``) under supervisord until a signal, a ``FATAL`` process or the end
    of supervisord; return the exit status: ``128 + N`` after signal N, else 1 (see the
    module docstring). ``announcement``: its text is written to ``out`` once its URL
    answers.

    Side effects: writes ``files.control`` (mode 0600, a new control password each
    time) and logs; relays the logs to ``out`` (default: stdout); on return no process
    it started is left. Raises ``SuperviseError`` (before starting anything) when the
    files list no programs or cannot be included.
    """
    listed = programs(config, includes)
    supervisord_env = supervisord_environment(env, files, config=config, includes=includes)
    password = secrets.token_urlsafe(24)
    control = control_config(files, password=password, as_root=os.geteuid() == 0)
    files.control.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    for directory in (files.pidfile.parent, files.log_dir):
        directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(files.control, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(control)
    sources = {SUPERVISOR_LABEL: files.log("supervisord")}
    sources.update({program.name: files.log(program.name) for program in listed})
    relay = LogRelay(sources, out or sys.stdout)
    announcer = _Announcer(announcement, relay)
    stop = _Stop()
    one_shot = {program.name for program in listed if program.one_shot}
    pids: dict[str, int] = {}
    failed: str | None = None
    dependencies = Dependencies(dependency_addresses(env))
    parked: set[str] = set()
    with stop.installed():
        supervisord = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(config)],
            cwd=BASE_DIR,
            env=supervisord_env,
            start_new_session=True,
            preexec_fn=_parent_death_signal(),
        )
        relay.start()
        stop.attach(supervisord)
        try:
            while supervisord.poll() is None:
                if stop.signum is None and failed is None:
                    dependencies.check()
                    states = _states(files.socket, password)
                    failed = _watch(states, one_shot | parked, pids)
                    blamed = dependencies.recently_down()
                    if failed is not None and blamed:
                        logger.warning(
                            "run: supervisord gave up on %s while %s %s down; starting it "
                            "again once %s answer",
                            failed,
                            " and ".join(blamed),
                            "is" if len(blamed) == 1 else "are",
                            "they" if len(blamed) > 1 else "it",
                        )
                        parked.add(failed)
                        failed = None
                    if parked and dependencies.settled():
                        _restart_parked(files, password, parked)
                    if failed is not None:
                        logger.error(
                            "run: supervisord gave up on %s (it kept exiting within %s s "
                            "of its start; see %s); stopping the platform",
                            failed,
                            START_SECONDS,
                            short_path(files.log(failed)),
                        )
                        stop.request()
                    else:
                        announcer.check(states, files)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    supervisord.wait(POLL_S)
        finally:
            if supervisord.poll() is None:
                stop.request()
                _wait_or_kill(supervisord, STOP_WAIT_SECONDS + 20)
            _stop_leftovers(pids)
            relay.stop()
            for outside in (files.socket, files.control):
                if outside.parent != files.pidfile.parent:
                    with contextlib.suppress(FileNotFoundError):
                        outside.unlink()
    if stop.signum is not None:
        return 128 + stop.signum
    if failed is None:
        logger.error("run: supervisord ended on its own (exit %s)", supervisord.returncode)
    return 1


def _states(socket_path: Path, password: str) -> list[dict[str, Any]]:
    """``process_states``, or none while supervisord does not answer (not listening
    yet, or busy: asked again at the next poll)."""
    try:
        return process_states(socket_path, password)
    except (OSError, xmlrpc.client.Error):
        return []


def _watch(states: list[dict[str, Any]], one_shot: set[str], pids: dict[str, int]) -> str | None:
    """Record each process's pid; return the name of one supervisord gave up on
    (``FATAL``), one-shot ones aside, or ``None``."""
    for state in states:
        if state.get("pid"):
            pids[state["name"]] = state["pid"]
    fatal = [s["name"] for s in states if s["statename"] == "FATAL" and s["name"] not in one_shot]
    return fatal[0] if fatal else None


def _restart_parked(files: SupervisorFiles, password: str, parked: set[str]) -> None:
    """Start again each program of ``parked`` (left ``FATAL`` during an outage). One
    supervisord does not answer for stays for the next poll; one it refuses (already
    started by hand, say) is left to the usual rule."""
    for name in sorted(parked):
        try:
            start_process(files.socket, password, name)
        except xmlrpc.client.Fault as exc:
            logger.warning("run: supervisord would not start %s again: %s", name, exc)
            parked.discard(name)
            continue
        except (OSError, xmlrpc.client.Error) as exc:
            logger.warning("run: could not start %s again yet: %s", name, exc)
            continue
        logger.info("run: starting %s again: its dependencies answer", name)
        parked.discard(name)


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
