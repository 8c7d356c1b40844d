"""The OpenAPI schema is the API's contract: the generated schema must equal the
reviewed copy in ``docs/openapi.json``, so that any change to the API (a field, a
parameter, an error response) shows in a diff that someone read. After an intended
change, regenerate the copy and commit it with the change:

    make schema
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

SNAPSHOT = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"
UPDATE = os.environ.get("UPDATE_SCHEMA_SNAPSHOT") == "1"

pytestmark = pytest.mark.django_db


def rendered(schema: dict[str, Any]) -> str:
    """The schema as the snapshot holds it: sorted keys, two-space indents, a newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_the_schema_matches_the_reviewed_snapshot() -> None:
    generated = rendered(APIClient().get("/api/schema/", {"format": "json"}).json())
    if UPDATE:
        SNAPSHOT.write_text(generated, encoding="utf-8")

    assert SNAPSHOT.read_text(encoding="utf-8") == generated, (
        "The API's schema changed. If that is intended, run `make schema` and commit "
        "docs/openapi.json with the change (git diff docs/openapi.json shows what changed)."
    )
