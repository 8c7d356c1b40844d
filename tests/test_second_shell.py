"""A second terminal beside ``make run``: where commands find the running platform.

``make run`` (``devtools.localservices run``) writes ``<run-dir>/env``; the development
settings read it (``twiscope.platform_env.load_platform_env``) when ``DATABASE_URL``,
``REDIS_URL`` or ``SECRET_KEY`` is unset. These tests use their own run dirs
(``TWISCOPE_RUN_DIR`` or a mapping that names one), never the repository's
``.run/env``, which belongs to a developer's running platform. The whole path (a
platform started as ``make run`` does and the README's replay command typed in a clean
shell) is in ``tests/test_run_supervision.py``.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from devtools.envfile import platform_env_file, write_platform_env
from twiscope.platform_env import (
    BASE_DIR,
    PLATFORM_PID_VARIABLE,
    PlatformNotRunning,
    load_platform_env,
    platform_env_path,
)

PLATFORM = {
    "DATABASE_URL": "postgres://postgres@127.0.0.1:54321/twiscope",
    "REDIS_URL": "redis://127.0.0.1:63790/0",
    "SECRET_KEY": "development-key-from-the-platform-0123456789abcdef",
}


def _write(run_dir: Path, pid: int | None = None) -> Path:
    path = run_dir / "env"
    values = dict(PLATFORM)
    if pid is not None:
        values[PLATFORM_PID_VARIABLE] = str(pid)
    write_platform_env(path, values)
    return path


def _clean_shell(**extra: str) -> dict[str, str]:
    """A new terminal's environment: no service variables, no settings module."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    return {**{key: os.environ[key] for key in keep if key in os.environ}, **extra}


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# --- finding the file -----------------------------------------------------------------------


def test_a_plain_shell_looks_for_the_platform_of_a_plain_make_run() -> None:
    assert platform_env_path({}) == BASE_DIR / ".run" / "env"


def test_twiscope_run_dir_points_a_shell_at_another_platform(tmp_path: Path) -> None:
    assert platform_env_path({"TWISCOPE_RUN_DIR": str(tmp_path)}) == tmp_path / "env"
    assert platform_env_path({"TWISCOPE_RUN_DIR": ".run/bench"}) == BASE_DIR / ".run/bench/env"


# --- writing it --------------------------------------------------------------------------------


def test_the_env_file_is_private_and_read_back_unchanged_by_django_environ(
    tmp_path: Path,
) -> None:
    values = {**PLATFORM, "DATABASE_URL": "postgres://app:p%40ss#1=x@db:5432/twiscope"}
    path = tmp_path / "env"
    write_platform_env(path, values)
    environ: dict[str, str] = {"TWISCOPE_RUN_DIR": str(tmp_path)}

    load_platform_env(environ)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert {key: environ[key] for key in values} == values


def test_a_value_the_reader_would_change_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SECRET_KEY"):
        write_platform_env(tmp_path / "env", {"SECRET_KEY": "'quoted'"})


def test_the_env_file_lasts_as_long_as_its_platform(tmp_path: Path) -> None:
    path = tmp_path / "env"

    with platform_env_file(path, PLATFORM):
        during = path.read_text()

    assert f"{PLATFORM_PID_VARIABLE}={os.getpid()}\n" in during
    assert not path.exists()


def test_an_env_file_replaced_by_another_platform_is_left_to_it(tmp_path: Path) -> None:
    path = tmp_path / "env"

    with platform_env_file(path, PLATFORM):
        write_platform_env(path, {**PLATFORM, "REDIS_URL": "redis://127.0.0.1:1/0"})

    assert "redis://127.0.0.1:1/0" in path.read_text()


# --- reading it ---------------------------------------------------------------------------------


def test_unset_variables_come_from_the_running_platform(tmp_path: Path) -> None:
    path = _write(tmp_path, pid=os.getpid())
    environ = {"TWISCOPE_RUN_DIR": str(tmp_path)}

    loaded = load_platform_env(environ)

    assert loaded == path
    assert {key: environ[key] for key in PLATFORM} == PLATFORM
    assert PLATFORM_PID_VARIABLE not in environ


def test_a_variable_already_set_is_never_overridden(tmp_path: Path) -> None:
    _write(tmp_path, pid=os.getpid())
    environ = {
        "TWISCOPE_RUN_DIR": str(tmp_path),
        "REDIS_URL": "redis://elsewhere:6379/3",
        "SECRET_KEY_FILE": "/run/secrets/key",
    }

    load_platform_env(environ)

    assert environ["REDIS_URL"] == "redis://elsewhere:6379/3"
    assert "SECRET_KEY" not in environ  # its <KEY>_FILE is set: that one wins
    assert environ["DATABASE_URL"] == PLATFORM["DATABASE_URL"]


def test_nothing_is_read_when_every_variable_is_set(tmp_path: Path) -> None:
    environ = {"TWISCOPE_RUN_DIR": str(tmp_path), **PLATFORM}

    assert load_platform_env(environ) is None


def test_no_platform_is_reported_with_the_command_that_starts_one(tmp_path: Path) -> None:
    environ = {"TWISCOPE_RUN_DIR": str(tmp_path), "SECRET_KEY": "set"}

    with pytest.raises(PlatformNotRunning, match=r"DATABASE_URL, REDIS_URL are not set.*make run"):
        load_platform_env(environ)


def test_a_file_left_by_a_platform_that_died_is_not_used(tmp_path: Path) -> None:
    pid = _dead_pid()
    _write(tmp_path, pid=pid)
    environ = {"TWISCOPE_RUN_DIR": str(tmp_path)}

    with pytest.raises(PlatformNotRunning, match=rf"no longer running \(pid {pid}\).*make run"):
        load_platform_env(environ)
    assert "DATABASE_URL" not in environ


def test_a_recycled_pid_does_not_pass_for_the_platform(tmp_path: Path) -> None:
    path = _write(tmp_path, pid=os.getpid())
    started = psutil.Process().create_time()
    os.utime(path, (started - 60, started - 60))

    with pytest.raises(PlatformNotRunning, match="no longer running"):
        load_platform_env({"TWISCOPE_RUN_DIR": str(tmp_path)})


# --- the settings and manage.py -----------------------------------------------------------------

PRINT_SETTINGS = (
    "import django; from django.conf import settings; django.setup(); "
    "print(settings.DATABASES['default']['PORT'], settings.REDIS_URL, settings.SECRET_KEY)"
)


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_development_settings_reach_the_running_platform(tmp_path: Path) -> None:
    _write(tmp_path, pid=os.getpid())
    env = _clean_shell(TWISCOPE_RUN_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="twiscope.settings")

    result = _python(PRINT_SETTINGS, env)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["54321", PLATFORM["REDIS_URL"], PLATFORM["SECRET_KEY"]]


def test_test_settings_ignore_a_running_platform(tmp_path: Path) -> None:
    _write(tmp_path, pid=os.getpid())
    env = _clean_shell(
        TWISCOPE_RUN_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="twiscope.settings_test"
    )

    result = _python(PRINT_SETTINGS, env)

    assert result.returncode == 0, result.stderr
    assert PLATFORM["SECRET_KEY"] not in result.stdout
    assert result.stdout.split()[:2] == ["5432", "redis://127.0.0.1:6379/15"]


def test_production_settings_ignore_a_running_platform(tmp_path: Path) -> None:
    _write(tmp_path, pid=os.getpid())
    env = _clean_shell(
        TWISCOPE_RUN_DIR=str(tmp_path),
        TWISCOPE_ENV="production",
        DJANGO_SETTINGS_MODULE="twiscope.settings",
    )

    result = _python(PRINT_SETTINGS, env)

    assert result.returncode != 0
    assert "Set the SECRET_KEY environment variable" in result.stderr


def test_manage_py_without_a_platform_says_to_start_make_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        check=False,
        cwd=BASE_DIR,
        env=_clean_shell(TWISCOPE_RUN_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "manage.py: DATABASE_URL, REDIS_URL, SECRET_KEY are not set and no platform is "
        f"running here (no {tmp_path / 'env'}): start it with `make run` in another "
        "terminal, or set them"
    ]
