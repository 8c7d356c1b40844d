"""The deployment files (docker-compose.yml, devtools/supervisord.conf for ``make run``,
Dockerfile) agree with each other
and with the queues the code routes to.

``docker-compose config`` (Debian's docker-compose v1 works without a Docker engine)
validates and normalises docker-compose.yml; the tests read its output. Without
docker-compose on PATH those tests skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from twiscope.celery import QUEUES

BASE_DIR = Path(__file__).resolve().parent.parent
# Every queue has a worker pool except `notify`, which has none yet.
POOL_QUEUES = frozenset(QUEUES) - {"notify"}
WORKER_SERVICES = frozenset(f"worker-{queue}" for queue in POOL_QUEUES)
COMPOSE_SECRET_KEY = "compose-config-check-not-a-real-secret-0123456789"
COMPOSE_CREDENTIAL_KEYS = "Y29tcG9zZS1jb25maWctY2hlY2stbm90LWEtcmVhbC0="


def _docker_compose() -> str:
    executable = shutil.which("docker-compose")
    if executable is None:
        reason = "docker-compose is not on PATH (make test installs it with apt-get when root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; required under CI=true")
        pytest.skip(reason)
    return executable


def _compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_docker_compose(), "-f", "docker-compose.yml", "config"],
        check=False,
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as ``docker-compose config`` normalises it."""
    env = {
        **os.environ,
        "SECRET_KEY": COMPOSE_SECRET_KEY,
        "TWISCOPE_CREDENTIAL_KEYS": COMPOSE_CREDENTIAL_KEYS,
    }
    result = _compose_config(env)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


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


def test_compose_file_is_valid_and_defines_every_service(
    services: dict[str, dict[str, Any]],
) -> None:
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
    env = {key: value for key, value in os.environ.items() if key != "SECRET_KEY"}
    env["TWISCOPE_CREDENTIAL_KEYS"] = COMPOSE_CREDENTIAL_KEYS
    result = _compose_config(env)
    assert result.returncode != 0
    assert "set SECRET_KEY" in result.stderr


def test_compose_refuses_to_start_without_a_credential_key() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TWISCOPE_CREDENTIAL_KEYS"}
    env["SECRET_KEY"] = COMPOSE_SECRET_KEY
    result = _compose_config(env)
    assert result.returncode != 0
    assert "set TWISCOPE_CREDENTIAL_KEYS" in result.stderr


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


def test_compose_has_a_worker_pool_for_every_queue_but_notify(
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


def test_make_run_runs_web_beat_sources_and_one_worker_per_queue_but_notify(
    make_run: dict[str, str],
) -> None:
    assert set(make_run) == {"web", "beat", "sources"} | WORKER_SERVICES
    assert _argv(make_run["sources"]) == ["python", "manage.py", "run_sources"]


def test_every_make_run_worker_consumes_the_queue_it_is_named_after(
    make_run: dict[str, str],
) -> None:
    queues = {name: _queues(make_run[name]) for name in WORKER_SERVICES}
    assert queues == {name: [name.removeprefix("worker-")] for name in WORKER_SERVICES}


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


def test_the_image_runs_as_a_non_root_user() -> None:
    instructions = [line.split() for line in (BASE_DIR / "Dockerfile").read_text().splitlines()]
    users = [words[1] for words in instructions if words[:1] == ["USER"]]
    assert users[-1:] == ["twiscope"]
