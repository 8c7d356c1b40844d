"""Restarting the embedded servers of ``make run`` when they die.

``devtools.localservices`` starts PostgreSQL and Redis itself (not under supervisord:
every program's environment names their ports before supervisord starts), so it also
watches them: a thread checks each server every ``POLL_S`` seconds and, when one is
gone (a crash, the OOM killer, a SIGKILL), starts it again on the same port and data
dir, logging ``services: redis died (pid N); restarting it on port P`` and then
``services: redis restarted on port P in S s`` (or why it could not). The platform's
processes ride out the gap themselves (see docs/operations.md, "Outages").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from devtools.base import LocalServicesError

logger = logging.getLogger(__name__)

POLL_S = 0.5
RETRY_AFTER_FAILURE_S = 5.0
"""After a restart that failed (``LocalServicesError``), the next try comes this much later."""


class Restartable(Protocol):
    """An embedded server: ``EmbeddedPostgres`` or ``EmbeddedRedis``."""

    @property
    def port(self) -> int | None: ...

    @property
    def pid(self) -> int | None: ...

    def alive(self) -> bool: ...

    def restart(self) -> None: ...


class Watchdog:
    """A daemon thread that restarts each of ``servers`` (``{name: server}``) when it
    dies. ``start()`` begins watching; ``stop()`` ends it (and waits for a restart in
    progress), and must come before the servers are stopped on purpose."""

    def __init__(self, servers: dict[str, Restartable], poll_s: float = POLL_S) -> None:
        self._servers = servers
        self._poll_s = poll_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="services-watchdog", daemon=True)
        self.restarts: list[str] = []
        """The names of the servers restarted so far, in order (for tests and logs)."""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        pids = {name: server.pid for name, server in self._servers.items()}
        while not self._stopping.wait(self._poll_s):
            for name, server in self._servers.items():
                if self._stopping.is_set():
                    return
                if server.alive():
                    pids[name] = server.pid
                    continue
                self._restart(name, server, pids.get(name))
                pids[name] = server.pid

    def _restart(self, name: str, server: Restartable, pid: int | None) -> None:
        logger.warning(
            "services: %s died (pid %s); restarting it on port %s", name, pid, server.port
        )
        started = time.monotonic()
        try:
            server.restart()
        except LocalServicesError as exc:
            logger.error("services: %s did not restart: %s", name, exc)
            self._stopping.wait(RETRY_AFTER_FAILURE_S)
            return
        self.restarts.append(name)
        logger.info(
            "services: %s restarted on port %s in %.2f s (pid %s)",
            name,
            server.port,
            time.monotonic() - started,
            server.pid,
        )


def watch(servers: Sequence[tuple[str, Restartable]]) -> Watchdog:
    """A started ``Watchdog`` over ``servers`` (``(name, server)`` pairs)."""
    watchdog = Watchdog(dict(servers))
    watchdog.start()
    return watchdog
