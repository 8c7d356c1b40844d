"""Where a running ``make run`` is, for commands typed in another terminal.

``make run`` (``devtools.localservices run``, a development tool that the product never
imports) writes ``<run-dir>/env`` while the platform runs: ``DATABASE_URL``,
``REDIS_URL``, the development ``SECRET_KEY`` (or ``SECRET_KEY_FILE``) and a few
development switches, one ``KEY=value`` per line, mode 0600, plus
``TWISCOPE_PLATFORM_PID`` (the process that wrote it). The development settings and
``manage.py`` read it here, through ``load_platform_env()``, when those variables are
unset, so ``manage.py``, ``celery -A twiscope`` and ``daphne`` typed in a second
terminal reach the running platform. ``TWISCOPE_RUN_DIR`` names the run dir (default:
the repository's ``.run``) for both the platform and the shell.

This module only reads; the writer is ``devtools.platform``, which takes the names below
from here so that the two agree.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import environ as django_environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_RUN_DIR = BASE_DIR / ".run"
# Where a running platform is, for commands typed in another shell (see the docstring).
RUN_DIR_VARIABLE = "TWISCOPE_RUN_DIR"
PLATFORM_ENV_FILE = "env"
PLATFORM_PID_VARIABLE = "TWISCOPE_PLATFORM_PID"
PLATFORM_VARIABLES = ("DATABASE_URL", "REDIS_URL", "SECRET_KEY")


class PlatformNotRunning(ImproperlyConfigured):
    """A command in a second shell found no running ``make run`` to take its settings
    from (an ``ImproperlyConfigured``, so Django reports it as a settings error)."""


def platform_run_dir(environ: Mapping[str, str]) -> Path:
    """The absolute run dir of ``make run``: ``TWISCOPE_RUN_DIR`` when set (a relative
    path is relative to the repository), else the repository's ``.run``."""
    if environ.get(RUN_DIR_VARIABLE):
        return (BASE_DIR / environ[RUN_DIR_VARIABLE]).resolve()
    return DEFAULT_RUN_DIR.resolve()


def platform_env_path(environ: Mapping[str, str]) -> Path:
    """The env file of the platform that commands in this shell talk to:
    ``<TWISCOPE_RUN_DIR>/env``, by default the repository's ``.run/env`` (what a plain
    ``make run`` writes)."""
    return platform_run_dir(environ) / PLATFORM_ENV_FILE


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
    # Imported here: only a development shell beside `make run` gets this far, so
    # psutil belongs with the development tools, not with the product's images.
    import psutil

    try:
        started: float = psutil.Process(int(pid_text)).create_time()
    except (ValueError, psutil.Error):
        return False
    return started <= written_at + 1.0


def _short(path: Path) -> str:
    """``path`` relative to the repository when inside it (keeps messages short)."""
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(BASE_DIR))
    return str(path)
