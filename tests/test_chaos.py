"""``make chaos`` in its short form: one fault of each kind against the real processes
of ``make run``, on embedded PostgreSQL and Redis of a private run dir.

``bench/chaos.py --short`` replays 5,000 CrisisLexT26 posts (looped with fresh ids) once
without faults and once while it SIGKILLs each worker pool's master, SIGKILLs Redis,
restarts PostgreSQL with a fast shutdown and drops five WebSocket clients in a loop
(see its docstring). Its report must show every check passed: every post stored once,
every alert once and held by every client after catch-up, nothing stuck, the same
trends and alerts as without faults, alert p99 under 2 s outside the fault windows,
every fault recovered by the platform itself. About 3-4 minutes.

The run gets a shell's environment without ``DATABASE_URL``/``REDIS_URL`` (so the
servers it kills are its own embedded ones, never those ``make test`` uses), a run dir
under the repository's ``.run/pytest/`` (the embedded PostgreSQL runs as a system user
when the tests run as root and must reach its data) and a free web port.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.base import free_port

BASE_DIR = Path(__file__).resolve().parent.parent
SHELL_BASICS = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "LOGNAME")
CHAOS_TIMEOUT_S = 540


@pytest.fixture(scope="module")
def chaos_report(shared_data: Path) -> Iterator[tuple[int, dict[str, Any], str]]:
    """The short chaos run's exit status, report and output tail."""
    run_dir = BASE_DIR / ".run" / "pytest" / f"chaos-{uuid.uuid4().hex[:8]}"
    run_dir.mkdir(parents=True)
    out = run_dir / "results"
    env = {key: os.environ[key] for key in SHELL_BASICS if key in os.environ}
    try:
        result = subprocess.run(
            [
                *(sys.executable, "-m", "devtools.localservices", "run"),
                *("--run-dir", str(run_dir), "--", sys.executable, "bench/chaos.py"),
                *("--short", "--data", str(shared_data)),
                *("--port", str(free_port()), "--out", str(out)),
            ],
            check=False,
            cwd=BASE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=CHAOS_TIMEOUT_S,
        )
        report = json.loads((out / "chaos.json").read_text())
        yield result.returncode, report, (result.stdout + result.stderr)[-6000:]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.slow
def test_a_short_chaos_run_injects_one_fault_of_each_kind(
    chaos_report: tuple[int, dict[str, Any], str],
) -> None:
    _, report, output = chaos_report
    kinds = {fault["kind"] for fault in report["faults"]}
    assert kinds == {"worker", "redis", "postgres"}, output
    assert report["events"] == 5000
    assert min(c["connects"] for c in report["facts"]["clients"].values()) >= 2


@pytest.mark.slow
def test_under_faults_nothing_is_lost_doubled_or_stuck(
    chaos_report: tuple[int, dict[str, Any], str],
) -> None:
    status, report, output = chaos_report
    failed = {name: c["detail"] for name, c in report["checks"].items() if not c["passed"]}
    assert (report["lost"], report["duplicated"]) == (0, 0), output
    assert failed == {}, output
    assert status == 0, output
