"""``make lint``'s dependency audit: pip-audit over each lock, and what it could check.

    python -m devtools.audit_deps [requirements/base.txt ...]

Runs ``pip-audit --disable-pip --require-hashes -r <lock> --format json`` on each lock
(default: ``requirements/base.txt``, ``ml.txt`` and ``dev.txt``): the locks pin every
package with its hashes, so pip-audit resolves nothing and installs nothing; it asks its
vulnerability service (PyPI's JSON API) about each pinned version.

Exit status: 1 when a known vulnerability is found (each printed with its fix
versions), else 0. A package pip-audit could not look up (the service unreachable, or a
local build such as ``torch==…+cpu``) is not a failure: the count is printed, and when
no package at all could be looked up the audit says plainly that nothing was checked
(a machine that reaches the package index but not its JSON API), rather than "no known
vulnerabilities". A pip-audit that cannot run at all is reported the same way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LOCKS = ("requirements/base.txt", "requirements/ml.txt", "requirements/dev.txt")
TIMEOUT_S = 600


def pip_audit_command() -> list[str]:
    """pip-audit beside this interpreter (the virtualenv's), else on ``PATH``."""
    beside = Path(sys.executable).with_name("pip-audit")
    found = str(beside) if beside.exists() else shutil.which("pip-audit")
    return [found] if found else [sys.executable, "-m", "pip_audit"]


def audit(lock: str) -> tuple[list[str], int, int] | str:
    """``(vulnerabilities, audited, skipped)`` for ``lock``, or a message saying why
    pip-audit gave no report. Runs pip-audit once (network: its vulnerability service)."""
    command = [
        *pip_audit_command(),
        "--disable-pip",
        "--require-hashes",
        "--progress-spinner",
        "off",
        "--format",
        "json",
        "-r",
        lock,
    ]
    try:
        done = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"pip-audit could not run: {exc}"
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"pip-audit gave no report (exit {done.returncode}): {tail[0]}"
    found: list[str] = []
    audited = skipped = 0
    for dependency in report.get("dependencies", []):
        if "skip_reason" in dependency:
            skipped += 1
            continue
        audited += 1
        for vuln in dependency.get("vulns", []):
            fixes = ", ".join(vuln.get("fix_versions", [])) or "none yet"
            found.append(
                f"{dependency['name']} {dependency['version']}: {vuln['id']} (fixed in {fixes})"
            )
    return found, audited, skipped


def main(argv: list[str]) -> int:
    """Audit each lock of ``argv`` (default ``LOCKS``); print what was and was not
    checked. Returns the exit status (module docstring)."""
    failed = False
    for lock in argv or list(LOCKS):
        result = audit(lock)
        if isinstance(result, str):
            print(f"pip-audit {lock}: NOT CHECKED: {result}")
            continue
        found, audited, skipped = result
        if found:
            failed = True
            print(f"pip-audit {lock}: {len(found)} known vulnerabilities:")
            print("\n".join(f"  {line}" for line in found))
        elif audited == 0:
            print(
                f"pip-audit {lock}: NOT CHECKED: none of its {skipped} packages could be "
                "looked up (the vulnerability service is unreachable from this machine)"
            )
        else:
            note = f"; {skipped} could not be looked up" if skipped else ""
            print(f"pip-audit {lock}: no known vulnerabilities in {audited} packages{note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
