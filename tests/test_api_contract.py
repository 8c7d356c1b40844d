"""The API against its own OpenAPI schema (``/api/schema/``), driven by schemathesis:
every operation, with a member's token, ``CONTRACT_EXAMPLES`` generated requests each
(default 100: a few thousand in all), in-process over WSGI. No answer may be a 5xx, and
every answer must be one the schema documents, in its documented content type, headers
and body shape.

Not checked: that every request the schema allows is accepted (schemathesis's
``positive_data_acceptance``). The schema cannot say which ids are the caller's, nor that
a date-time must lie between 1900 and 3000, so a valid-looking request may rightly get a
documented 400 or 404.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, given, settings
from rest_framework.test import APIClient

from tests.factories import api_key, make_personas, make_rule, make_source
from twiscope.redis import get_redis

if os.environ.get("CI") != "true":
    pytest.importorskip("schemathesis", reason="schemathesis is in requirements/test.in")
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.django_db

EXAMPLES = int(os.environ.get("CONTRACT_EXAMPLES", "100"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="session")
def api_schema(django_db_setup: Any, django_db_blocker: Any) -> Any:
    with django_db_blocker.unblock():
        document = APIClient().get("/api/schema/", {"format": "json"}).json()
    loaded = schemathesis.openapi.from_dict(document)
    loaded.app = get_wsgi_application()
    return loaded


@pytest.fixture
def token() -> Iterator[str]:
    """A token of a team's owner, the team with a source and a rule. The requests run
    in the test's transaction: Django's test client keeps its connection open the same
    way (a WSGI request's end would close it)."""
    get_redis().flushdb()
    personas = make_personas()
    make_source(personas.team)
    make_rule(personas.team)
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield api_key(personas.owner)
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def test_every_operation_keeps_its_contract(api_schema: Any, token: str) -> None:
    # One hypothesis run per operation, here rather than through schemathesis's pytest
    # plugin (its parametrize does not run under pytest 9): every operation is tried
    # even when one fails, and the failures are reported together.
    failures: list[str] = []
    calls: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def keeps_its_contract(case: Any) -> None:
            calls.append(case.operation.label)
            case.call_and_validate(headers={"Authorization": f"Token {token}"}, checks=CHECKS)

        try:
            keeps_its_contract()
        except (Exception, BaseExceptionGroup) as exc:
            failures.append(f"{operation.label}: {type(exc).__name__}: {str(exc)[:2000]}")

    print(f"schemathesis: {len(calls)} requests over {len(operations)} operations")
    assert len(operations) >= 30
    assert not failures, "\n\n".join(failures)
