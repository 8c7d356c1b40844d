"""What the embedded servers, the launcher and the runner share: the loopback address,
timeouts, the error type, and small helpers for ports and processes."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

BASE_DIR = Path(__file__).resolve().parent.parent
LOCALHOST = "127.0.0.1"
PROBE_TIMEOUT_S = 1.0
STOP_TIMEOUT_S = 30.0


class LocalServicesError(RuntimeError):
    """A service could not be provided; the message says which and why."""


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int) -> bool:
    """Whether something accepts a TCP connection on ``host:port`` within
    ``PROBE_TIMEOUT_S``. Never raises."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def is_running(pid: int, name_contains: str) -> bool:
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


def short_path(path: Path | None) -> str:
    """``path`` relative to the repository when inside it (keeps logs short); ``-`` for
    ``None``."""
    if path is None:
        return "-"
    for candidate in (path, path.resolve()):
        with contextlib.suppress(ValueError):
            return str(candidate.relative_to(BASE_DIR))
    return str(path)
