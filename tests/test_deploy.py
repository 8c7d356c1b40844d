"""The deployment files (docker-compose.yml, devtools/supervisord.conf for ``make run``,
Dockerfile, the dependency locks) agree with each other and with the queues the code
routes to.

docker-compose.yml is read as Compose reads it, without docker-compose or a Docker engine:
YAML (anchors and merge keys resolved), variables interpolated as the Compose
Specification says (``${VAR}``, ``$VAR``, ``${VAR:-default}``, ``${VAR-default}``,
``${VAR:?error}``, ``${VAR?error}``, ``${VAR:+alt}``, ``${VAR+alt}``, ``$$``), then validated
against the Specification's JSON schema (tests/compose-spec/, vendored with its licence).
The tests read that document.

The images: the Dockerfile's stages, the lock each one installs (requirements/*.txt) and
the target each compose service builds.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from twiscope.queues import NAMES

BASE_DIR = Path(__file__).resolve().parent.parent
COMPOSE_SCHEMA = Path(__file__).resolve().parent / "compose-spec" / "compose-spec.json"
REQUIREMENTS_DIR = BASE_DIR / "requirements"
# Every queue of twiscope.queues has a worker pool, named after it.
POOL_QUEUES = frozenset(NAMES)
WORKER_SERVICES = frozenset(f"worker-{queue}" for queue in POOL_QUEUES)
# The pools that run the models (mlengine's inference): on the ML image; all else on the
# slim one.
INFERENCE_SERVICES = frozenset({"worker-inference", "worker-inference-gpu"})
# What the slim image must never install: the models' frameworks and what they pull in.
MODEL_PACKAGES = frozenset(
    {"torch", "transformers", "onnxruntime", "onnx", "sentence-transformers", "triton"}
)
COMPOSE_SECRET_KEY = "compose-config-check-not-a-real-secret-0123456789"
COMPOSE_CREDENTIAL_KEYS = "Y29tcG9zZS1jb25maWctY2hlY2stbm90LWEtcmVhbC0="
COMPOSE_ENV = {
    "SECRET_KEY": COMPOSE_SECRET_KEY,
    "TWISCOPE_CREDENTIAL_KEYS": COMPOSE_CREDENTIAL_KEYS,
}

# ``$$``, ``${NAME}`` / ``${NAME<op><word>}`` (op one of :- - :? ? :+ +), or ``$NAME``.
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<word>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class ComposeInterpolationError(ValueError):
    """A required variable (``${VAR:?error}`` / ``${VAR?error}``) is missing."""


def _interpolate(value: str, env: Mapping[str, str]) -> str:
    """``value`` with its variables replaced from ``env``, per the Compose Specification's
    interpolation rules (an unset variable with no default becomes ""). Raises
    ``ComposeInterpolationError`` with the file's message for a missing required one."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, word = match["op"] or "", match["word"] or ""
        current = env.get(name, "")
        # With a colon, an empty value counts as unset.
        present = bool(current) if op.startswith(":") else name in env
        if op.endswith("?") and not present:
            raise ComposeInterpolationError(f"required variable {name} is missing: {word}")
        if op.endswith("-"):
            return current if present else word
        if op.endswith("+"):
            return word if present else ""
        return current

    return _VARIABLE.sub(replace, value)


def _interpolated(node: Any, env: Mapping[str, str]) -> Any:
    """``node`` (parsed YAML) with every string value interpolated; keys are left as they
    are, as the Specification says."""
    if isinstance(node, str):
        return _interpolate(node, env)
    if isinstance(node, dict):
        return {key: _interpolated(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolated(item, env) for item in node]
    return node


def _compose_document(env: Mapping[str, str]) -> dict[str, Any]:
    """docker-compose.yml as Compose resolves it for ``env``: YAML with its anchors and
    merge keys, variables interpolated. Raises ``ComposeInterpolationError``."""
    raw = yaml.safe_load((BASE_DIR / "docker-compose.yml").read_text())
    document: dict[str, Any] = _interpolated(raw, env)
    return document


def _schema_errors(document: Mapping[str, Any]) -> list[str]:
    """Where ``document`` breaks the Compose Specification's schema (empty when valid)."""
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as Compose reads it, with both required keys set."""
    return _compose_document(COMPOSE_ENV)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


@pytest.fixture(scope="module")
def make_run() -> dict[str, str]:
    """The programs of ``make run`` (devtools/supervisord.conf) and their command lines,
    as written there (``%(ENV_PORT)s``: supervisord fills it in from ``PORT``)."""
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"))
    parser.read(BASE_DIR / "devtools" / "supervisord.conf")
    return {
        section.removeprefix("program:"): parser[section]["command"]
        for section in parser.sections()
        if section.startswith("program:")
    }


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def _queues(command: str | list[str]) -> list[str]:
    """The queues a ``celery worker`` command line consumes (``-Q a,b`` / ``--queues=a,b``)."""
    argv = _argv(command)
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("-Q", "--queues")]
    values += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--queues=")]
    return [queue for value in values for queue in value.split(",")]


def _worker_names(names: Iterable[str]) -> set[str]:
    return {name for name in names if name.startswith("worker-")}


def test_compose_file_is_valid_against_the_compose_specification(
    compose: dict[str, Any],
) -> None:
    assert _schema_errors(compose) == []


def test_the_schema_check_rejects_what_compose_would(compose: dict[str, Any]) -> None:
    broken = {
        **compose,
        "services": {**compose["services"], "web": {**compose["services"]["web"], "prots": []}},
    }
    assert _schema_errors(broken) == [
        "services/web: 'prots' does not match any of the regexes: '^x-'"
    ]


def test_compose_file_defines_every_service(services: dict[str, dict[str, Any]]) -> None:
    expected = {
        "postgres",
        "redis",
        "migrate",
        "web",
        "beat",
        "sources",
        "worker-inference-gpu",
    } | WORKER_SERVICES
    assert expected <= set(services)


def test_compose_refuses_to_start_without_a_secret_key() -> None:
    env = {key: value for key, value in COMPOSE_ENV.items() if key != "SECRET_KEY"}
    with pytest.raises(ComposeInterpolationError, match="set SECRET_KEY"):
        _compose_document(env)


def test_compose_refuses_to_start_without_a_credential_key() -> None:
    env = {key: value for key, value in COMPOSE_ENV.items() if key != "TWISCOPE_CREDENTIAL_KEYS"}
    with pytest.raises(ComposeInterpolationError, match="set TWISCOPE_CREDENTIAL_KEYS"):
        _compose_document(env)


@pytest.mark.parametrize(
    ("value", "env", "expected"),
    [
        ("${A:-x}", {}, "x"),
        ("${A:-x}", {"A": ""}, "x"),
        ("${A-x}", {"A": ""}, ""),
        ("${A:+y}", {"A": "1"}, "y"),
        ("${A+y}", {}, ""),
        ("$A/${B}", {"A": "a", "B": "b"}, "a/b"),
        ("$$A ${A}", {"A": "a"}, "$A a"),
        ("${A}", {}, ""),
    ],
)
def test_compose_variables_are_interpolated_as_the_specification_says(
    value: str, env: dict[str, str], expected: str
) -> None:
    assert _interpolate(value, env) == expected


def test_the_compose_redis_never_evicts_a_key(services: dict[str, dict[str, Any]]) -> None:
    """The broker and the staged work live in Redis: when it is full it must refuse
    writes, never drop a queued task (``maxmemory-policy noeviction``), and it keeps an
    append-only file."""
    argv = _argv(services["redis"]["command"])
    options = dict(zip(argv[1::2], argv[2::2], strict=False))

    assert argv[0] == "redis-server"
    assert options["--maxmemory-policy"] == "noeviction"
    assert options["--appendonly"] == "yes"


def test_every_application_service_runs_in_production_mode_with_the_secret_key(
    services: dict[str, dict[str, Any]],
) -> None:
    app_services = {"migrate", "web", "beat", "sources"} | _worker_names(services)
    environments = {name: services[name]["environment"] for name in app_services}
    assert {env["TWISCOPE_ENV"] for env in environments.values()} == {"production"}
    assert {env["SECRET_KEY"] for env in environments.values()} == {COMPOSE_SECRET_KEY}
    assert {env["TWISCOPE_CREDENTIAL_KEYS"] for env in environments.values()} == {
        COMPOSE_CREDENTIAL_KEYS
    }
    assert all(env["DATABASE_URL"] and env["REDIS_URL"] for env in environments.values())


def test_worker_services_have_no_container_name_and_no_ports(
    services: dict[str, dict[str, Any]],
) -> None:
    workers = _worker_names(services)
    assert workers >= WORKER_SERVICES
    assert {name for name in workers if "container_name" in services[name]} == set()
    assert {name for name in workers if services[name].get("ports")} == set()


def test_no_service_pins_a_container_name(services: dict[str, dict[str, Any]]) -> None:
    assert {name for name, service in services.items() if "container_name" in service} == set()


def test_only_web_publishes_a_port(services: dict[str, dict[str, Any]]) -> None:
    assert {name for name, service in services.items() if service.get("ports")} == {"web"}


def test_every_compose_worker_consumes_the_queue_it_is_named_after(
    services: dict[str, dict[str, Any]],
) -> None:
    queues = {name: _queues(services[name]["command"]) for name in WORKER_SERVICES}
    assert queues == {name: [name.removeprefix("worker-")] for name in WORKER_SERVICES}


def test_compose_has_a_worker_pool_for_every_queue(
    services: dict[str, dict[str, Any]],
) -> None:
    consumed = {
        queue for name in _worker_names(services) for queue in _queues(services[name]["command"])
    }
    assert consumed == POOL_QUEUES


def test_the_gpu_worker_is_an_optional_inference_pool_reserving_an_nvidia_gpu(
    services: dict[str, dict[str, Any]],
) -> None:
    gpu = services["worker-inference-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["profiles"] == ["gpu"]
    assert _queues(gpu["command"]) == ["inference"]
    assert gpu["environment"]["TWISCOPE_MODELS_DIR"] == "/models"
    assert int(gpu["environment"]["SCORING_BATCH_SIZE"]) > 128
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_web_and_workers_wait_for_migrations(
    services: dict[str, dict[str, Any]],
) -> None:
    dependants = {"web", "beat", "sources"} | _worker_names(services)
    conditions = {name: services[name]["depends_on"]["migrate"]["condition"] for name in dependants}
    assert set(conditions.values()) == {"service_completed_successfully"}


def test_postgres_keeps_its_data_in_a_volume_and_reports_health(
    services: dict[str, dict[str, Any]],
) -> None:
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:16")
    assert any("/var/lib/postgresql/data" in volume for volume in postgres["volumes"])
    assert postgres["healthcheck"]["test"]


def test_make_run_runs_web_beat_sources_and_one_worker_per_queue(
    make_run: dict[str, str],
) -> None:
    assert set(make_run) == {"web", "beat", "sources"} | WORKER_SERVICES
    assert _argv(make_run["sources"]) == ["python", "manage.py", "run_sources"]


def test_every_make_run_worker_consumes_the_queue_it_is_named_after(
    make_run: dict[str, str],
) -> None:
    queues = {name: _queues(make_run[name]) for name in WORKER_SERVICES}
    assert queues == {name: [name.removeprefix("worker-")] for name in WORKER_SERVICES}


def test_only_the_anomaly_pool_runs_at_a_lower_cpu_priority(
    make_run: dict[str, str], services: dict[str, dict[str, Any]]
) -> None:
    # A catch-up of years of anomaly buckets takes only the CPU the pipeline leaves.
    compose = {name: _argv(services[name]["command"]) for name in _worker_names(services)}
    local = {name: _argv(make_run[name]) for name in _worker_names(make_run)}

    for argv_by_name in (compose, local):
        assert {name for name, argv in argv_by_name.items() if argv[0] == "nice"} == {
            "worker-anomalies"
        }
    # compose's ${ANOMALY_NICE:-10}, interpolated as compose would without the variable.
    assert compose["worker-anomalies"][:4] == local["worker-anomalies"][:4]
    assert local["worker-anomalies"][:4] == ["nice", "-n", "10", "celery"]


def test_make_run_and_compose_run_the_same_worker_pools(
    make_run: dict[str, str], services: dict[str, dict[str, Any]]
) -> None:
    make_run_queues = {
        queue for name in _worker_names(make_run) for queue in _queues(make_run[name])
    }
    compose_queues = {
        queue for name in _worker_names(services) for queue in _queues(services[name]["command"])
    }
    assert make_run_queues == compose_queues == POOL_QUEUES


def test_make_run_web_serves_the_asgi_app_on_port_from_the_environment(
    make_run: dict[str, str],
) -> None:
    assert _argv(make_run["web"]) == [
        "daphne",
        "-b",
        "127.0.0.1",
        "-p",
        "%(ENV_PORT)s",
        "twiscope.asgi:application",
    ]


def _dockerfile_stages() -> dict[str, list[list[str]]]:
    """The Dockerfile's named stages: name -> its instructions, each as words (continued
    lines joined, comments dropped), the ``FROM`` first."""
    text = re.sub(r"\\\n", " ", (BASE_DIR / "Dockerfile").read_text())
    lines = [line.split() for line in text.splitlines()]
    instructions = [words for words in lines if words and not words[0].startswith("#")]
    stages: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for words in instructions:
        if words[0] == "FROM":
            current = []
            stages[words[-1] if len(words) == 4 else words[1]] = current
        current.append(words)
    return stages


def _stage_chain(target: str) -> list[str]:
    """``target`` and the stages of this Dockerfile it is built ``FROM``, base first."""
    stages = _dockerfile_stages()
    chain = [target]
    while (parent := stages[chain[0]][0][1]) in stages:
        chain.insert(0, parent)
    return chain


def _pip_installs(target: str) -> list[list[str]]:
    """The words of each ``RUN`` of ``target``'s image that mentions pip, in build order."""
    stages = _dockerfile_stages()
    runs = [words for stage in _stage_chain(target) for words in stages[stage]]
    return [words for words in runs if words[0] == "RUN" and "pip" in " ".join(words)]


def _installed_locks(target: str) -> list[str]:
    """The requirement files (``-r``) that ``target``'s image installs."""
    return [
        words[i + 1] for words in _pip_installs(target) for i, w in enumerate(words) if w == "-r"
    ]


def _lock_entries(path: Path) -> list[str]:
    """The requirement entries of a lock file: each logical line (continuations joined),
    comments and blank lines dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = (" ".join(line.split("#", 1)[0].split()) for line in text.splitlines())
    return [line for line in lines if line]


def _normalised(name: str) -> str:
    """A package name as PEP 503 compares them: lower case, runs of ``-_.`` as ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked_names(path: Path) -> set[str]:
    """The normalised names of the packages a lock pins."""
    return {_normalised(entry.split("==", 1)[0]) for entry in _lock_entries(path)}


def _service_targets(services: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The Dockerfile target of each compose service that builds one."""
    return {
        name: service["build"]["target"] for name, service in services.items() if "build" in service
    }


def test_each_service_builds_the_image_it_needs(services: dict[str, dict[str, Any]]) -> None:
    targets = _service_targets(services)
    assert set(targets) == {"migrate", "web", "beat", "sources"} | _worker_names(services)
    images = {(target, services[name]["image"]) for name, target in targets.items()}
    assert {name for name, target in targets.items() if target == "ml"} == INFERENCE_SERVICES
    assert {target for name, target in targets.items() if name not in INFERENCE_SERVICES} == {"web"}
    assert images == {("web", "twiscope:latest"), ("ml", "twiscope-ml:latest")}


def test_the_web_and_worker_image_installs_no_torch(
    services: dict[str, dict[str, Any]],
) -> None:
    slim_targets = {
        target
        for name, target in _service_targets(services).items()
        if name not in INFERENCE_SERVICES
    }
    locks = {lock for target in slim_targets for lock in _installed_locks(target)}
    names = {name for lock in locks for name in _locked_names(BASE_DIR / lock)}
    assert locks == {"requirements/base.txt"}
    assert {"django", "celery", "daphne", "numpy"} <= names
    assert names & MODEL_PACKAGES == set()
    assert {name for name in names if name.startswith(("nvidia-", "cuda-"))} == set()


def test_the_ml_image_installs_the_models_frameworks() -> None:
    names = {name for lock in _installed_locks("ml") for name in _locked_names(BASE_DIR / lock)}
    assert _installed_locks("ml") == ["requirements/ml.txt"]
    assert {"torch", "transformers", "onnxruntime", "django", "celery"} <= names


def test_the_base_lock_is_a_subset_of_the_ml_lock_at_the_same_versions() -> None:
    base = set(_lock_entries(REQUIREMENTS_DIR / "base.txt"))
    ml = set(_lock_entries(REQUIREMENTS_DIR / "ml.txt"))
    assert base - ml == set()


def test_every_image_installs_only_its_lock_with_hashes() -> None:
    installs = {target: _pip_installs(target) for target in ("web", "ml")}
    assert installs == {
        target: [["RUN", "pip", "install", "--require-hashes", "-r", f"requirements/{lock}"]]
        for target, lock in (("web", "base.txt"), ("ml", "ml.txt"))
    }


@pytest.mark.parametrize("lock", ["base.txt", "ml.txt", "dev.txt"])
def test_every_requirement_of_a_lock_is_pinned_with_a_hash(lock: str) -> None:
    entries = _lock_entries(REQUIREMENTS_DIR / lock)
    pinned = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==\S+( --hash=sha256:[0-9a-f]{64})+$")
    assert len(entries) > 10
    assert [entry for entry in entries if not pinned.match(entry)] == []


@pytest.mark.parametrize("lock", ["base.txt", "ml.txt", "dev.txt"])
def test_a_lock_names_no_index_path_or_host(lock: str) -> None:
    text = (REQUIREMENTS_DIR / lock).read_text()
    options = r"--(?:extra-)?index-url|--find-links|--trusted-host"
    assert re.findall(rf"://|(?<![\w.-])/\w|{options}", text) == []


@pytest.mark.parametrize("lock", ["base.txt", "ml.txt", "dev.txt"])
def test_a_lock_satisfies_every_pin_of_its_input_file(lock: str) -> None:
    def pins(path: Path) -> list[Requirement]:
        """Each requirement of an input file and of those it includes (-r)."""
        entries = _lock_entries(path)
        included = [entry.split()[1] for entry in entries if entry.startswith("-r ")]
        own = [Requirement(entry) for entry in entries if not entry.startswith("-")]
        return own + [pin for name in included for pin in pins(path.parent / name)]

    locked = {
        _normalised(name): Version(version)
        for name, version in (
            entry.split()[0].split("==", 1) for entry in _lock_entries(REQUIREMENTS_DIR / lock)
        )
    }
    wanted = pins(REQUIREMENTS_DIR / lock.replace(".txt", ".in"))
    # A local build (torch 2.13.0+cpu) satisfies ==2.13.0, as pip reads it.
    unmet = [
        str(pin)
        for pin in wanted
        if _normalised(pin.name) not in locked or locked[_normalised(pin.name)] not in pin.specifier
    ]
    assert len(wanted) > 10
    assert unmet == []


def test_make_installs_the_development_lock_with_hashes() -> None:
    makefile = (BASE_DIR / "Makefile").read_text()
    assert "pip install --quiet --require-hashes -r requirements/dev.txt" in makefile
    assert "$(STAMP): requirements/dev.txt" in makefile


def test_the_images_carry_no_development_package_tests_or_benchmarks() -> None:
    ignored = set((BASE_DIR / ".dockerignore").read_text().splitlines())
    assert {"devtools", "tests", "bench"} <= ignored


@pytest.mark.parametrize("target", ["web", "ml"])
def test_the_image_runs_as_a_non_root_user(target: str) -> None:
    users = [words[1] for words in _dockerfile_stages()[target] if words[0] == "USER"]
    assert users[-1:] == ["twiscope"]
