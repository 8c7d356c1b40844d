"""What ``make run`` keeps in its run dir for later runs and other shells: the
development keys, and ``<run-dir>/env``, which tells a second terminal where the
running platform is (read back by ``twiscope.platform_env``)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from devtools.base import LocalServicesError, short_path
from twiscope.platform_env import PLATFORM_PID_VARIABLE

logger = logging.getLogger(__name__)


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
    logger.info("services: other shells find this platform in %s", short_path(path))
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            if path.read_text() == text:
                path.unlink()
