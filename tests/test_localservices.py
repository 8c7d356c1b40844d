"""devtools.localservices: where PostgreSQL and Redis come from, and the embedded ones
really starting and stopping.

The choice logic is tested with fake probes. The embedded servers are real (a few
seconds): they run from a data dir under the repository's ``.run/pytest/``, never the
developer's ``.run/pgdata``, so a ``make run`` on the same checkout is untouched.
"""

from __future__ import annotations

import ast
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psutil
import psycopg2
import pytest
import redis

from devtools.base import free_port
from devtools.envfile import development_secret_key
from devtools.localservices import (
    LOCAL_DATABASE_URL,
    LOCAL_REDIS_URL,
    Choice,
    child_environment,
    choose,
    provide,
    redact,
    run_dir_for,
)
from devtools.postgres import EmbeddedPostgres, postgres_answers
from devtools.redis import EmbeddedRedis, redis_answers

T = TypeVar("T")

BASE_DIR = Path(__file__).resolve().parent.parent
SERVICE_VARIABLES = ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "SECRET_KEY_FILE")
ENV_DATABASE_URL = "postgres://app:s3cret@db.internal:5432/twiscope"
ENV_REDIS_URL = "redis://cache.internal:6379/2"


def _must_not_probe() -> bool:
    raise AssertionError("a service named by the environment must not be probed")


def _answers() -> bool:
    return True


def _silent() -> bool:
    return False


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A private run dir inside the repository (the embedded PostgreSQL runs as a
    system user when the tests run as root; it must be able to reach its data dir,
    which pytest's own 0700 temporary root would not allow)."""
    path = BASE_DIR / ".run" / "pytest" / uuid.uuid4().hex[:12]
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _port_closed(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _clean_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in SERVICE_VARIABLES}


# --- choosing ---------------------------------------------------------------------------


def test_run_mode_uses_the_urls_from_the_environment() -> None:
    environ = {"DATABASE_URL": ENV_DATABASE_URL, "REDIS_URL": ENV_REDIS_URL}
    chosen = choose("run", environ, postgres_probe=_must_not_probe, redis_probe=_must_not_probe)
    assert chosen == (
        Choice("postgres", "environment", ENV_DATABASE_URL),
        Choice("redis", "environment", ENV_REDIS_URL),
    )


def test_test_mode_uses_the_urls_from_the_environment_without_probing() -> None:
    environ = {"DATABASE_URL": ENV_DATABASE_URL, "REDIS_URL": ENV_REDIS_URL}
    chosen = choose("test", environ, postgres_probe=_must_not_probe, redis_probe=_must_not_probe)
    assert [choice.origin for choice in chosen] == ["environment", "environment"]


def test_run_mode_starts_embedded_servers_when_none_is_configured() -> None:
    chosen = choose("run", {}, postgres_probe=_must_not_probe, redis_probe=_must_not_probe)
    assert chosen == (
        Choice("postgres", "embedded", None),
        Choice("redis", "embedded", None),
    )


def test_test_mode_prefers_servers_answering_on_their_default_ports() -> None:
    chosen = choose("test", {}, postgres_probe=_answers, redis_probe=_answers)
    assert chosen == (
        Choice("postgres", "local", LOCAL_DATABASE_URL),
        Choice("redis", "local", LOCAL_REDIS_URL),
    )


def test_test_mode_falls_back_to_embedded_servers_when_the_default_ports_are_silent() -> None:
    chosen = choose("test", {}, postgres_probe=_silent, redis_probe=_silent)
    assert [choice.origin for choice in chosen] == ["embedded", "embedded"]


def test_test_mode_can_be_told_to_ignore_servers_on_the_default_ports() -> None:
    chosen = choose(
        "test",
        {},
        postgres_probe=_must_not_probe,
        redis_probe=_must_not_probe,
        use_local=False,
    )
    assert [choice.origin for choice in chosen] == ["embedded", "embedded"]


def test_each_service_is_chosen_on_its_own() -> None:
    chosen = choose(
        "test",
        {"DATABASE_URL": ENV_DATABASE_URL},
        postgres_probe=_must_not_probe,
        redis_probe=_silent,
    )
    assert chosen == (
        Choice("postgres", "environment", ENV_DATABASE_URL),
        Choice("redis", "embedded", None),
    )


def test_an_empty_variable_counts_as_unset() -> None:
    chosen = choose("run", {"DATABASE_URL": "", "REDIS_URL": ""})
    assert [choice.origin for choice in chosen] == ["embedded", "embedded"]


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode must be"):
        choose("prod", {})  # type: ignore[arg-type]


def test_logged_urls_hide_the_password() -> None:
    assert redact(ENV_DATABASE_URL) == "postgres://app:***@db.internal:5432/twiscope"
    assert redact(LOCAL_DATABASE_URL) == LOCAL_DATABASE_URL


def test_the_settings_module_set_by_importing_twiscope_is_not_handed_on() -> None:
    env = child_environment({"DJANGO_SETTINGS_MODULE": "twiscope.settings", "PATH": "/bin"})
    assert env == {"PATH": "/bin"}


def test_a_settings_module_chosen_by_the_user_is_handed_on() -> None:
    env = child_environment({"DJANGO_SETTINGS_MODULE": "mysite.settings"})
    assert env == {"DJANGO_SETTINGS_MODULE": "mysite.settings"}


def test_run_mode_keeps_its_data_where_twiscope_run_dir_says(tmp_path: Path) -> None:
    environ = {"TWISCOPE_RUN_DIR": str(tmp_path)}

    assert run_dir_for("run", environ) == tmp_path
    assert run_dir_for("run", {"TWISCOPE_RUN_DIR": ".run/bench"}) == BASE_DIR / ".run/bench"
    assert run_dir_for("run", environ, tmp_path / "given") == tmp_path / "given"
    assert run_dir_for("test", environ) == BASE_DIR / ".run" / "test"


def test_probes_report_a_port_nothing_listens_on_as_silent() -> None:
    port = free_port()
    assert postgres_answers(port=port) is False
    assert redis_answers(port=port) is False


def test_the_development_secret_key_is_generated_once_and_kept_private(
    tmp_path: Path,
) -> None:
    first = development_secret_key(tmp_path)
    second = development_secret_key(tmp_path)
    mode = stat.S_IMODE((tmp_path / "secret-key").stat().st_mode)
    assert first == second
    assert len(first) >= 50
    assert mode == 0o600


# --- embedded servers ---------------------------------------------------------------------


def test_embedded_postgres_starts_serves_the_twiscope_database_and_stops(
    run_dir: Path,
) -> None:
    server = EmbeddedPostgres(run_dir / "pgdata", durable=False)
    try:
        url = server.start()
        port = server.port
        with psycopg2.connect(url, connect_timeout=5) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT current_database(), inet_server_addr()::text")
            database, address = cursor.fetchone()
        conn.close()
    finally:
        server.stop()
    assert url == f"postgres://postgres@127.0.0.1:{port}/twiscope"
    assert (database, address) == ("twiscope", "127.0.0.1/32")
    assert port is not None and _port_closed(port)


def test_embedded_redis_starts_answers_on_tcp_and_stops(run_dir: Path) -> None:
    server = EmbeddedRedis(run_dir / "redis", durable=False, db=15)
    try:
        url = server.start()
        port, pid = server.port, server.pid
        client = redis.Redis.from_url(url, socket_timeout=5)
        answered = client.ping()
        client.close()
    finally:
        server.stop()
    assert url == f"redis://127.0.0.1:{port}/15"
    assert answered is True
    assert port is not None and _port_closed(port)
    assert pid is not None and not _alive(pid)


def test_the_embedded_redis_refuses_writes_when_full_rather_than_evict(run_dir: Path) -> None:
    """``make run``'s Redis holds Celery's queues and the staged work: with a memory
    limit reached it must answer an error, never drop a key to make room."""
    server = EmbeddedRedis(run_dir / "redis", durable=False)
    try:
        client = redis.Redis.from_url(server.start(), socket_timeout=5)
        policy = client.config_get("maxmemory-policy")
        client.set("queued-task", "kept")
        client.config_set("maxmemory", "1")
        with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
            client.set("another", "x" * 1000)
        kept = client.get("queued-task")
        client.close()
    finally:
        server.stop()
    assert policy == {"maxmemory-policy": "noeviction"}
    assert kept == b"kept"


def test_servers_left_running_by_a_killed_supervisor_are_replaced(
    run_dir: Path,
) -> None:
    # The first pair is abandoned, as when the supervisor is SIGKILLed.
    abandoned_postgres = EmbeddedPostgres(run_dir / "pgdata", durable=False)
    abandoned_redis = EmbeddedRedis(run_dir / "redis", durable=False)
    abandoned_postgres.start()
    abandoned_redis.start()
    old_ports = (abandoned_postgres.port, abandoned_redis.port)
    postgres = EmbeddedPostgres(run_dir / "pgdata", durable=False)
    redis_server = EmbeddedRedis(run_dir / "redis", durable=False)
    try:
        postgres.start()
        redis_server.start()
        new_ports = (postgres.port, redis_server.port)
    finally:
        redis_server.stop()
        postgres.stop()
    assert all(port is not None and _port_closed(port) for port in old_ports + new_ports)


def test_stopping_a_server_that_never_started_does_nothing(run_dir: Path) -> None:
    postgres, redis_server = EmbeddedPostgres(run_dir / "pgdata"), EmbeddedRedis(run_dir / "redis")

    postgres.stop()
    redis_server.stop()

    assert postgres.port is None and redis_server.port is None
    assert not (run_dir / "pgdata").exists()


def test_the_postgres_binaries_are_found_in_the_wheel_without_importing_it() -> None:
    code = (
        "import sys; from devtools.postgres import postgres_bin_dir; bin_dir = postgres_bin_dir(); "
        "print((bin_dir / 'initdb').is_file(), (bin_dir / 'pg_ctl').is_file(), "
        "'embedded_postgres' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.stdout.split() == ["True", "True", "False"], result.stderr


def _alive(pid: int) -> bool:
    try:
        status: str = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return False
    return bool(status != psutil.STATUS_ZOMBIE)


# --- the boundary ---------------------------------------------------------------------------

PRODUCT_PACKAGES = ("twiscope", "teams", "ingest", "mlengine", "alerts", "dashboard")


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    return names


def test_the_product_never_imports_the_development_tools() -> None:
    files = [
        path for name in PRODUCT_PACKAGES for path in sorted((BASE_DIR / name).glob("**/*.py"))
    ]
    files += [BASE_DIR / "manage.py"]
    importers = {
        str(path.relative_to(BASE_DIR))
        for path in files
        for module in _imported_modules(path)
        if module == "devtools" or module.startswith("devtools.")
    }

    assert len(files) > 100
    assert importers == set()


# --- the command line ----------------------------------------------------------------------

CHILD = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
env = os.environ
print(env["DATABASE_URL"], env["REDIS_URL"], bool(env.get("SECRET_KEY")), flush=True)
time.sleep(60)
"""


def _run_python(run_dir: Path, code: str) -> list[str]:
    """``python -m devtools.localservices run`` around ``python -c code``."""
    return [
        *(sys.executable, "-m", "devtools.localservices", "run", "--run-dir", str(run_dir)),
        *("--", sys.executable, "-c", code),
    ]


def test_the_cli_gives_the_command_embedded_services_and_stops_them_on_sigterm(
    run_dir: Path,
) -> None:
    process = subprocess.Popen(
        _run_python(run_dir, CHILD),
        cwd=BASE_DIR,
        env=_clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    database_url, redis_url, has_secret = process.stdout.readline().split()
    process.send_signal(signal.SIGTERM)
    _, log = process.communicate(timeout=60)
    postgres_port = int(database_url.rsplit(":", 1)[1].split("/")[0])
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    assert process.returncode == 7, log
    assert database_url.startswith("postgres://postgres@127.0.0.1:")
    assert redis_url.startswith("redis://127.0.0.1:")
    assert has_secret == "True"
    assert "services: postgres=embedded" in log and "services: redis=embedded" in log
    assert _port_closed(postgres_port) and _port_closed(redis_port)
    assert stat.S_IMODE((run_dir / "secret-key").stat().st_mode) == 0o600


def test_the_cli_passes_configured_urls_through_and_returns_the_command_status(
    run_dir: Path,
) -> None:
    env = {
        **_clean_environment(),
        "DATABASE_URL": ENV_DATABASE_URL,
        "REDIS_URL": ENV_REDIS_URL,
    }
    result = subprocess.run(
        _run_python(run_dir, "import os, sys; print(os.environ['DATABASE_URL']); sys.exit(3)"),
        check=False,
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3
    assert result.stdout.strip() == ENV_DATABASE_URL
    assert "postgres=environment (postgres://app:***@db.internal:5432/twiscope)" in result.stderr
    assert "s3cret" not in result.stderr
    assert not (run_dir / "pgdata").exists()


SHOW_ENV_FILE = """
import os
from pathlib import Path
run_dir = os.environ.get("TWISCOPE_RUN_DIR")
path = Path(run_dir or ".") / "env"
print(run_dir, oct(path.stat().st_mode & 0o777) if path.exists() else "-")
print(path.read_text() if path.exists() else "", end="")
"""


def test_the_cli_tells_other_shells_where_the_services_are_while_the_command_runs(
    run_dir: Path,
) -> None:
    env = {
        **_clean_environment(),
        "DATABASE_URL": ENV_DATABASE_URL,
        "REDIS_URL": ENV_REDIS_URL,
    }
    result = subprocess.run(
        _run_python(run_dir, SHOW_ENV_FILE),
        check=False,
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    first, *lines = result.stdout.splitlines()
    *values, pid = [line for line in lines if not line.startswith("#")]
    key = (run_dir / "secret-key").read_text().strip()
    credential_key = (run_dir / "credential-key").read_text().strip()

    assert result.returncode == 0, result.stderr
    assert first == f"{run_dir} 0o600"
    assert values == [
        f"DATABASE_URL={ENV_DATABASE_URL}",
        f"REDIS_URL={ENV_REDIS_URL}",
        f"SECRET_KEY={key}",
        f"TWISCOPE_CREDENTIAL_KEYS={credential_key}",
        "SOURCES_ALLOW_PRIVATE_URLS=true",
    ]
    assert stat.S_IMODE((run_dir / "credential-key").stat().st_mode) == 0o600
    assert pid.removeprefix("TWISCOPE_PLATFORM_PID=").isdigit()
    assert not (run_dir / "env").exists()


def test_test_mode_writes_no_env_file(run_dir: Path) -> None:
    env = {
        **_clean_environment(),
        "DATABASE_URL": ENV_DATABASE_URL,
        "REDIS_URL": ENV_REDIS_URL,
    }
    result = subprocess.run(
        [
            *(sys.executable, "-m", "devtools.localservices", "test", "--run-dir", str(run_dir)),
            *("--", sys.executable, "-c", SHOW_ENV_FILE),
        ],
        check=False,
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == "None -\n"


@pytest.mark.slow
def test_embedded_servers_that_die_are_restarted_on_their_port_with_their_data(
    run_dir: Path,
) -> None:
    """SIGKILL to each embedded server while ``provide`` runs: each comes back on the
    same port (every process's URL names it) with what it had stored."""
    with provide("run", environ={}, run_dir=run_dir) as env:
        cache = redis.Redis.from_url(env["REDIS_URL"], socket_timeout=5)
        cache.set("kept", "yes")
        database = psycopg2.connect(env["DATABASE_URL"])
        with database, database.cursor() as cursor:
            cursor.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)")
        database.close()
        time.sleep(1.5)  # the append-only file is fsynced every second
        pidfile = cache.config_get("pidfile")["pidfile"]  # type: ignore[index]
        redis_pid = int(Path(pidfile).read_text())
        postmaster_pid = int((run_dir / "pgdata" / "postmaster.pid").read_text().split()[0])

        os.kill(redis_pid, signal.SIGKILL)
        os.kill(postmaster_pid, signal.SIGKILL)
        kept = _eventually(lambda: cache.get("kept"), redis.RedisError)
        rows = _eventually(
            lambda: _select(env["DATABASE_URL"], "SELECT x FROM kept"), psycopg2.Error
        )

    assert kept == b"yes"
    assert rows == [(1,)]


def _eventually(read: Callable[[], T], errors: type[Exception], timeout_s: float = 60) -> T:
    """``read()`` once it stops raising ``errors`` (the server is back)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return read()
        except errors:
            assert time.monotonic() < deadline, "the server did not come back"
            time.sleep(0.2)


def _select(url: str, query: str) -> list[tuple[object, ...]]:
    conn = psycopg2.connect(url, connect_timeout=2)
    try:
        with conn.cursor() as cursor:
            cursor.execute(query)
            return list(cursor.fetchall())
    finally:
        conn.close()
