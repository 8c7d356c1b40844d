"""``make run``: prepare the database, say how to get in, start every process.

Usage (``make run`` wraps it in ``twiscope.localservices run``, which provides
``DATABASE_URL``, ``REDIS_URL`` and a development ``SECRET_KEY``)::

    python -m twiscope.run [--skip-bootstrap] [--procfile PATH]

Steps, each in a child process with this environment:

1. ``manage.py migrate --noinput``; ``manage.py collectstatic --noinput`` (quiet);
2. ``manage.py bootstrap_demo`` (unless ``--skip-bootstrap``): creates the demo user
   and API token, prints ``{"username", "password", "token"}`` as JSON on its last
   stdout line and writes the token to ``.run/api-token``;
3. a banner on stdout: dashboard URL, demo login, API token and its file, API docs;
4. the ``Procfile``'s processes through honcho's ``Manager`` (web, one Celery worker
   per queue, beat), plus a ``replay`` process when ``REPLAY`` is set.

Environment: ``PORT`` (web port, default 8000); ``REPLAY`` (a path handed to
``manage.py replay``) and ``SPEED`` (its ``--speed``, default ``max``).

Stopping: Ctrl-C (or SIGTERM) makes honcho send SIGTERM to each process's group
(honcho starts each in its own session, so Celery's prefork children go too) and
SIGKILL to whatever is left after 5 s. The exit status is honcho's: 130 after SIGINT,
143 after SIGTERM, or the status of the first process that stopped on its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from honcho.environ import parse_procfile
from honcho.manager import Manager
from honcho.printer import Printer

logger = logging.getLogger("twiscope.run")

BASE_DIR = Path(__file__).resolve().parent.parent
RUN_DIR = BASE_DIR / ".run"
TOKEN_FILE = RUN_DIR / "api-token"
DEFAULT_PROCFILE = BASE_DIR / "Procfile"
DEFAULT_PORT = "8000"

# A finished replay must not end the platform: honcho's Manager stops every process as
# soon as any one exits (a Procfile lists long-running processes), so after the replay
# the process idles until honcho stops it with the others. `sleep` in a loop rather
# than `sleep infinity`, which BSD/macOS sleep does not take.
REPLAY_COMMAND = (
    '{python} manage.py replay "$REPLAY" --speed "${{SPEED:-max}}"; '
    'echo "replay: finished (exit $?); the platform keeps running, Ctrl-C stops it"; '
    "while :; do sleep 3600; done"
)


class RunError(RuntimeError):
    """A preparation step failed; the message names it."""


@dataclass(frozen=True)
class DemoLogin:
    """What ``bootstrap_demo`` reports: the demo user's login and API token."""

    username: str
    password: str
    token: str


def process_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment every child gets: ``environ`` with this interpreter's bin
    directory first on ``PATH`` (so ``celery``/``daphne`` in the Procfile are the
    virtualenv's even when it is not activated), ``PORT`` defaulted and Python's
    output unbuffered (so honcho shows log lines as they happen)."""
    env = dict(environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", os.defpath)])
    env["PORT"] = env.get("PORT") or DEFAULT_PORT
    env["PYTHONUNBUFFERED"] = "1"
    return env


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
    ``username``, ``password``, ``token`` (strings).
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
    fields = ("username", "password", "token")
    if not isinstance(data, dict) or not all(isinstance(data.get(f), str) for f in fields):
        raise RunError(
            f"manage.py bootstrap_demo's JSON must have string fields {', '.join(fields)}"
        )
    return DemoLogin(username=data["username"], password=data["password"], token=data["token"])


def prepare(env: Mapping[str, str], *, bootstrap: bool) -> DemoLogin | None:
    """Migrate, collect static files and (when ``bootstrap``) create the demo login.

    Side effects: schema changes in the database, files in ``STATIC_ROOT``, the demo
    user and token (and ``.run/api-token``). Raises ``RunError`` on a failed step.
    """
    manage(["migrate", "--noinput"], env)
    manage(["collectstatic", "--noinput", "--verbosity", "0"], env)
    if not bootstrap:
        return None
    stdout = manage(["bootstrap_demo"], env, capture=True)
    # Its other output (if any) is for the user; the last line is for us.
    for line in stdout.splitlines()[:-1]:
        print(line)
    return parse_bootstrap_output(stdout)


def banner(port: str, demo: DemoLogin | None, replay: str | None, speed: str) -> str:
    """The lines that tell a user where everything is (plain text, no colours)."""
    base = f"http://127.0.0.1:{port}"
    rows = [("Dashboard", f"{base}/")]
    if demo is None:
        rows.append(("Login", "(demo bootstrap skipped)"))
    else:
        rows += [
            ("Login", f"{demo.username} / {demo.password}"),
            ("API token", demo.token),
            ("Token file", _short(TOKEN_FILE)),
        ]
    rows.append(("API docs", f"{base}/api/docs/"))
    if replay:
        rows.append(("Replay", f"{replay} at speed {speed}"))
    rows.append(("Stop", "Ctrl-C"))
    rule = "=" * 72
    body = [f"  {label:<11} {value}" for label, value in rows]
    return "\n".join([rule, "  Twiscope is starting", *body, rule])


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(BASE_DIR))
    except ValueError:
        return str(path)


def build_manager(
    procfile: Path,
    env: Mapping[str, str],
    *,
    replay: bool,
    printer: Printer | None = None,
) -> Manager:
    """A honcho ``Manager`` with every Procfile process (and ``replay`` when asked).

    Each process runs through ``/bin/sh -c`` in the repository with ``env`` (so the
    shell expands ``$PORT``). Raises ``RunError`` when the Procfile lists nothing.
    """
    processes = parse_procfile(procfile.read_text()).processes
    if not processes:
        raise RunError(f"{procfile} lists no processes")
    manager = Manager(printer or Printer(sys.stdout))
    for name, command in processes.items():
        manager.add_process(name, command, env=dict(env), cwd=str(BASE_DIR))
    if replay:
        manager.add_process(
            "replay",
            REPLAY_COMMAND.format(python=shlex.quote(sys.executable)),
            env=dict(env),
            cwd=str(BASE_DIR),
        )
    return manager


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m twiscope.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--skip-bootstrap",
        action="store_true",
        help="do not run manage.py bootstrap_demo",
    )
    parser.add_argument("--procfile", type=Path, default=DEFAULT_PROCFILE)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    env = process_environment(os.environ)
    replay = env.get("REPLAY") or None
    speed = env.get("SPEED") or "max"
    RUN_DIR.mkdir(exist_ok=True)
    try:
        demo = prepare(env, bootstrap=not options.skip_bootstrap)
        manager = build_manager(options.procfile, env, replay=bool(replay))
    except RunError as exc:
        logger.error("run: %s", exc)
        return 1
    except KeyboardInterrupt:
        logger.info("run: interrupted before the processes started")
        return 130
    print(banner(env["PORT"], demo, replay, speed), flush=True)
    manager.loop()
    return manager.returncode if manager.returncode is not None else 0


if __name__ == "__main__":
    sys.exit(main())
