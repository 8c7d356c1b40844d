"""Which way imports run (DESIGN.md, "Layout"), checked on every test run.

The contracts live in pyproject.toml (``[tool.importlinter]``); ``make lint`` runs the
same check with ``lint-imports``. The contracts themselves are tested too: copied beside
a small tree of the same packages that breaks one rule each, they must report it.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("twiscope", "teams", "ingest", "mlengine", "alerts", "dashboard", "devtools")
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", "--config", str(cwd / "pyproject.toml")],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_import_linter_contracts_are_kept() -> None:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]

    result = _lint_imports(ROOT)

    assert result.returncode == 0, result.stdout + result.stderr
    assert {c["type"] for c in contracts["contracts"]} == {
        "layers",
        "protected",
        "acyclic_siblings",
        "forbidden",
    }
    assert f"Contracts: {len(contracts['contracts'])} kept, 0 broken." in result.stdout


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The project's packages, empty but for what a test writes, beside a copy of its
    pyproject.toml (so the copy's contracts are the ones checked)."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    named = {"mlengine.facade", "twiscope.api_urls"}
    for contract in contracts["contracts"]:
        named.update(contract.get("source_modules", ()))
    for module in named - set(PACKAGES):
        _write(tmp_path, module, "")
    return tmp_path


def _write(tree: Path, module: str, source: str) -> None:
    path = tree.joinpath(*module.split(".")).with_suffix(".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in path.relative_to(tree).parents:
        init = tree / parent / "__init__.py"
        if parent != Path(".") and not init.exists():
            init.write_text("")
    path.write_text(source)


def test_a_tree_that_keeps_the_rules_passes(tree: Path) -> None:
    _write(tree, "mlengine.trends.stage", "")
    _write(tree, "alerts.evaluation", "from mlengine import facade\n")
    _write(tree, "twiscope.api_urls", "from mlengine.trends import stage\n")

    result = _lint_imports(tree)

    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    ("modules", "broken"),
    [
        # A module of mlengine no list names, reached past the facade.
        (
            {"mlengine.brand_new.room": "", "dashboard.views": "import mlengine.brand_new.room\n"},
            "mlengine-private",
        ),
        (
            {"alerts.views": "from mlengine import models\n", "mlengine.models": ""},
            "mlengine-private",
        ),
        # An import that runs back up the flow.
        (
            {"ingest.services": "from alerts import evaluation\n", "alerts.evaluation": ""},
            "flow",
        ),
        # Two sibling modules that import each other.
        (
            {
                "alerts.claims": "from alerts import sweeps\n",
                "alerts.sweeps": "from alerts import claims\n",
            },
            "acyclic",
        ),
        ({"twiscope.queues": "import ingest\n"}, "wiring"),
        ({"twiscope.settings": "import devtools\n"}, "devtools"),
    ],
)
def test_each_contract_reports_the_import_it_forbids(
    tree: Path, modules: dict[str, str], broken: str
) -> None:
    for module, source in modules.items():
        _write(tree, module, source)

    result = _lint_imports(tree)

    contracts = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["importlinter"]
    name = next(c["name"] for c in contracts["contracts"] if c["id"] == broken)
    report = "".join(result.stdout.split())  # lint-imports wraps long names anywhere
    assert result.returncode == 1
    assert "".join(f"{name} BROKEN".split()) in report
    assert f"Contracts:{len(contracts['contracts']) - 1}kept,1broken." in report
