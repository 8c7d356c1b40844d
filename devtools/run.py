"""``make run``: prepare the database, start and supervise every process, and say how to
get in once the web server answers.

Usage (``make run`` wraps it in ``devtools.localservices run``, which provides
``DATABASE_URL``, ``REDIS_URL``, a development ``SECRET_KEY`` and ``TWISCOPE_RUN_DIR``)::

    python -m devtools.run [--skip-bootstrap] [--config PATH]

Steps, each in a child process with this environment:

1. the web port (``PORT``) must be free on 127.0.0.1, or it stops here with exit status
   1 and a line that names the port and how to pick another (``make run PORT=...``);
2. ``manage.py migrate --noinput``; ``manage.py collectstatic --noinput`` (quiet);
3. ``manage.py bootstrap_demo`` (unless ``--skip-bootstrap``): creates the demo team,
   user (its password set only then) and API token, prints ``{"username", "password",
   "token", "team"}`` as JSON on its last stdout line (``password`` is null once it no
   longer opens the account) and writes the token to ``<run-dir>/api-token``;
4. every program of ``devtools/supervisord.conf`` (web, one Celery worker per queue,
   the sources, beat; and, when ``REPLAY`` is set, the one-shot ``replay`` of
   ``devtools/supervisord-replay.conf``) under supervisord, in the foreground
   (``devtools.supervise``), each line of their output relayed to ours with the
   program's name in front (``devtools.logrelay``);
5. once the web server answers HTTP, a banner on stdout: dashboard URL, demo login, API
   token and its file, API docs, where the logs are, how to see the processes.

Another shell can see and drive the processes with ``.venv/bin/supervisorctl -c
<run-dir>/supervisor/control.conf status`` (or ``restart twiscope:worker-enrich``).

Environment: ``PORT`` (web port, default 8000); ``REPLAY`` (a path handed to
``manage.py replay``) and ``SPEED`` (its ``--speed``, default ``max``);
``TWISCOPE_RUN_DIR`` (default: the repository's ``.run``).

Exit status: 130 after SIGINT, 143 after SIGTERM; 1 when the port is taken, when a
preparation step fails, when supervisord gives up on a process, or when supervisord
ends on its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from devtools.base import BASE_DIR, LOCALHOST, short_path
from devtools.supervise import (
    CONFIG,
    REPLAY_CONFIG,
    Announcement,
    SuperviseError,
    SupervisorFiles,
    programs,
    supervise,
)
from twiscope.platform_env import DEFAULT_RUN_DIR, platform_run_dir

logger = logging.getLogger(__name__)

DEFAULT_PORT = "8000"
SUPERVISORCTL = Path(sys.executable).parent / "supervisorctl"
# How far above a taken port to look for a free one to suggest.
PORT_SUGGESTION_RANGE = 20


class RunError(RuntimeError):
    """The web port is taken, or a preparation step failed; the message says which."""


@dataclass(frozen=True)
class DemoLogin:
    """What ``bootstrap_demo`` reports: the demo user's login and API token.
    ``password`` is ``None`` when the one kept in the run dir no longer opens the
    account (changed with ``manage.py changepassword``)."""

    username: str
    password: str | None
    token: str


def process_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment every child gets: ``environ`` with this interpreter's bin
    directory first on ``PATH`` (so ``celery``/``daphne``/``python`` in the config are
    the virtualenv's even when it is not activated), ``PORT`` defaulted and Python's
    output unbuffered (so log lines are relayed as they happen)."""
    env = dict(environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", os.defpath)])
    env["PORT"] = env.get("PORT") or DEFAULT_PORT
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- The web port ------------------------------------------------------------------------


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    """Whether the web server could listen on ``host:port`` now: a bind with
    ``SO_REUSEADDR``, as Twisted (Daphne's server) binds on POSIX, so a port that only
    has connections closing (TIME_WAIT) counts as free. Never raises."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def check_port(port_text: str, host: str = LOCALHOST) -> int:
    """The web port, checked before anything starts.

    Raises ``RunError`` naming the port, the program that holds it when that can be
    seen, and a free port to pick instead (``make run PORT=...``) when it is taken;
    or saying that ``PORT`` is not a port number.
    """
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise RunError(f"PORT={port_text!r} is not a TCP port number (1-65535)")
    if port_is_free(port, host):
        return port
    others = range(port + 1, min(port + PORT_SUGGESTION_RANGE, 65535) + 1)
    free = next((other for other in others if port_is_free(other, host)), None)
    pick = f"make run PORT={free}" if free is not None else "make run PORT=<another port>"
    raise RunError(
        f"port {port} on {host} is in use by another program{_holder(port)}; the web "
        f"server cannot listen there. Stop that program, or pick another port: {pick}"
    )


def _holder(port: int) -> str:
    """`` (name, pid N)`` of the process listening on ``port``, when this user may see
    it; else an empty string."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return ""
    for connection in connections:
        if (
            connection.status == psutil.CONN_LISTEN
            and connection.laddr
            and connection.laddr.port == port
            and connection.pid
        ):
            try:
                name = psutil.Process(connection.pid).name()
            except psutil.Error:
                return f" (pid {connection.pid})"
            return f" ({name}, pid {connection.pid})"
    return ""


# --- Preparing ----------------------------------------------------------------------------


def manage(args: Sequence[str], env: Mapping[str, str], *, capture: bool = False) -> str:
    """Run ``manage.py ARGS`` in the repository; return its stdout when ``capture``.

    stderr always goes to ours. Raises ``RunError`` naming the command when it fails.
    """
    command = [sys.executable, "manage.py", *args]
    result = subprocess.run(
        command,
        check=False,
        cwd=BASE_DIR,
        env=dict(env),
        stdout=subprocess.PIPE if capture else None,
        text=True,
    )
    if result.returncode != 0:
        raise RunError(f"manage.py {' '.join(args)} failed with exit status {result.returncode}")
    return result.stdout or ""


def parse_bootstrap_output(stdout: str) -> DemoLogin:
    """The ``DemoLogin`` in ``bootstrap_demo``'s last non-empty stdout line.

    Raises ``RunError`` when that line is missing, not a JSON object, or lacks one of
    ``username``, ``token`` (strings) or ``password`` (a string or null).
    """
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise RunError("manage.py bootstrap_demo printed nothing; expected a JSON line")
    try:
        data = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise RunError(
            f"manage.py bootstrap_demo's last line is not JSON: {lines[-1][:200]!r}"
        ) from exc
    fields = ("username", "token")
    if (
        not isinstance(data, dict)
        or not all(isinstance(data.get(f), str) for f in fields)
        or not isinstance(data.get("password", 0), str | None)
    ):
        raise RunError(
            "manage.py bootstrap_demo's JSON must have string fields username, token "
            "and a password (a string, or null)"
        )
    return DemoLogin(username=data["username"], password=data["password"], token=data["token"])


def prepare(env: Mapping[str, str], *, bootstrap: bool, run_dir: Path) -> DemoLogin | None:
    """Migrate, collect static files and (when ``bootstrap``) create the demo login.

    Side effects: schema changes in the database, files in ``STATIC_ROOT``, the demo
    team, user and token (and ``<run_dir>/api-token``). Raises ``RunError`` on a
    failed step.
    """
    manage(["migrate", "--noinput"], env)
    manage(["collectstatic", "--noinput", "--verbosity", "0"], env)
    if not bootstrap:
        return None
    stdout = manage(["bootstrap_demo", "--run-dir", str(run_dir)], env, capture=True)
    # Its other output (if any) is for the user; the last line is for us.
    for line in stdout.splitlines()[:-1]:
        print(line)
    return parse_bootstrap_output(stdout)


def banner(
    port: str,
    demo: DemoLogin | None,
    replay: str | None,
    speed: str,
    run_dir: Path = DEFAULT_RUN_DIR,
) -> str:
    """The lines that tell a user where everything is (plain text, no colours)."""
    base = f"http://127.0.0.1:{port}"
    files = SupervisorFiles(run_dir)
    rows = [("Dashboard", f"{base}/")]
    if demo is None:
        rows.append(("Login", "(demo bootstrap skipped)"))
    else:
        password = demo.password
        if password is None:
            password = (
                f"(changed since {short_path(run_dir / 'demo-password')}; "
                f"reset it with manage.py changepassword {demo.username})"
            )
        rows += [
            ("Login", f"{demo.username} / {password}"),
            ("API token", demo.token),
            ("Token file", short_path(run_dir / "api-token")),
        ]
    rows.append(("API docs", f"{base}/api/docs/"))
    if replay:
        rows.append(("Replay", f"{replay} at speed {speed}"))
    rows += [
        ("Logs", short_path(files.log_dir / "<process>.log")),
        ("Processes", f"{short_path(SUPERVISORCTL)} -c {short_path(files.control)} status"),
        ("Stop", "Ctrl-C"),
    ]
    rule = "=" * 72
    body = [f"  {label:<11} {value}" for label, value in rows]
    return "\n".join([rule, "  Twiscope is running", *body, rule])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m devtools.run", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--skip-bootstrap",
        action="store_true",
        help="do not run manage.py bootstrap_demo",
    )
    parser.add_argument("--config", type=Path, default=CONFIG, help="supervisord's config")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    env = process_environment(os.environ)
    replay = env.get("REPLAY") or None
    speed = env.get("SPEED") or "max"
    run_dir = platform_run_dir(env)
    run_dir.mkdir(parents=True, exist_ok=True)
    files = SupervisorFiles(run_dir)
    try:
        includes = [REPLAY_CONFIG] if replay else []
        # A config supervisord cannot use fails before the slow steps.
        programs(options.config, includes)
        check_port(env["PORT"])
        demo = prepare(env, bootstrap=not options.skip_bootstrap, run_dir=run_dir)
        # Again: the preparation took seconds, in which another program may have come.
        check_port(env["PORT"])
    except (RunError, SuperviseError) as exc:
        logger.error("run: %s", exc)
        return 1
    except KeyboardInterrupt:
        logger.info("run: interrupted before the processes started")
        return 130
    url = f"http://{LOCALHOST}:{env['PORT']}/"
    logger.info("run: starting every process; the banner follows once %s answers", url)
    announcement = Announcement(url, banner(env["PORT"], demo, replay, speed, run_dir))
    try:
        return supervise(
            env, files, config=options.config, includes=includes, announcement=announcement
        )
    except SuperviseError as exc:
        logger.error("run: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
