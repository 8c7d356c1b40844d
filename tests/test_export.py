"""Streamed export: ``GET /api/events/export/`` and ``manage.py export`` (issue 19, item 2)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.core.management import CommandError, call_command
from django.db import connection, connections
from django.http import StreamingHttpResponse
from django.test import AsyncClient
from rest_framework.test import APIClient

from ingest import exporting
from ingest.api.serializers import EventSerializer
from ingest.models import Event
from tests.factories import (
    api_key,
    child_database_url,
    envelope,
    make_personas,
    make_source,
    run_through,
)
from twiscope.redis import get_redis

REPO = Path(__file__).resolve().parents[1]
TRICKY = 'He said "hi", then\nleft; 1,2 — naïve @ops =SUM(A1)'


def client_for(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_key(user)}")
    return client


def body_of(response: StreamingHttpResponse) -> str:
    return b"".join(response.streaming_content).decode()


@pytest.fixture
def world():
    get_redis().flushdb()
    personas = make_personas()
    source = make_source(personas.team)
    second = make_source(personas.team, name="second")
    run_through(
        source,
        [envelope(f"#blizzard post {i}", minutes=i) for i in range(7)]
        + [envelope(TRICKY, minutes=8)],
    )
    run_through(second, [envelope("#blizzard elsewhere", minutes=3)])
    other = make_source(personas.other_team, name="theirs")
    run_through(other, [envelope("secret of the rivals #blizzard", minutes=2)])
    return personas, source, second, other


def export(user, query: str):
    return client_for(user).get(f"/api/events/export/?{query}")


def assert_download(response, content_type: str, extension: str) -> None:
    assert response.status_code == 200
    assert isinstance(response, StreamingHttpResponse)
    assert response["Content-Type"] == content_type
    disposition = response["Content-Disposition"]
    assert disposition.startswith('attachment; filename="twiscope-events-')
    assert disposition.endswith(f'.{extension}"')


@pytest.mark.django_db
def test_the_csv_export_streams_every_event_of_the_callers_teams(world) -> None:
    personas, source, second, _other = world

    response = export(personas.member, "format=csv")

    assert_download(response, "text/csv; charset=utf-8", "csv")
    rows = list(csv.DictReader(io.StringIO(body_of(response))))
    assert len(rows) == 9
    assert tuple(rows[0]) == exporting.CSV_HEADER
    assert {int(r["source"]) for r in rows} == {source.id, second.id}
    assert TRICKY in {r["text"] for r in rows}
    stored = Event.objects.filter(source__team=personas.team)
    assert {r["external_id"] for r in rows} == set(stored.values_list("external_id", flat=True))


@pytest.mark.django_db
def test_a_jsonl_line_is_the_events_api_representation(world) -> None:
    personas, _source, _second, _other = world

    response = export(personas.owner, "format=jsonl")

    assert_download(response, "application/jsonl", "jsonl")
    lines = body_of(response).splitlines()
    assert len(lines) == 9
    objects = [json.loads(line) for line in lines]
    # The events list's items, less the search-only ``highlight``.
    api = {
        e.id: {
            k: v
            for k, v in json.loads(json.dumps(EventSerializer(e).data)).items()
            if k != "highlight"
        }
        for e in Event.objects.filter(source__team=personas.team)
    }
    assert {o["id"]: o for o in objects} == api
    assert tuple(objects[0]) == exporting.EVENT_FIELDS


@pytest.mark.django_db
def test_the_export_takes_the_events_lists_filters_and_order(world) -> None:
    personas, source, _second, _other = world

    response = export(
        personas.member, f"format=jsonl&source={source.id}&q=post&until=2015-02-20T12:05:00Z"
    )

    lines = [json.loads(line) for line in body_of(response).splitlines()]
    assert [o["external_id"] for o in lines] == [
        e["external_id"]
        for e in client_for(personas.member)
        .get(f"/api/events/?source={source.id}&q=post&until=2015-02-20T12:05:00Z")
        .json()["results"]
    ]
    assert len(lines) == 5
    assert [o["created_at"] for o in lines] == sorted(
        (o["created_at"] for o in lines), reverse=True
    )


@pytest.mark.django_db
def test_the_outsider_exports_only_their_own_teams_events(world) -> None:
    personas, source, _second, other = world

    mine = export(personas.outsider, "format=csv")
    theirs = export(personas.outsider, f"format=csv&source={source.id}")

    rows = list(csv.DictReader(io.StringIO(body_of(mine))))
    assert [int(r["source"]) for r in rows] == [other.id]
    assert theirs.status_code == 400
    assert "source" in theirs.json()


@pytest.mark.django_db
def test_a_member_cannot_export_another_teams_source(world) -> None:
    personas, _source, _second, other = world

    response = export(personas.member, f"format=jsonl&source={other.id}")

    assert response.status_code == 400
    assert response.json()["source"][0].startswith("Select a valid choice")


@pytest.mark.django_db
@pytest.mark.parametrize("query", ["format=xml", "format=json", "", "format="])
def test_an_unknown_or_missing_format_is_a_field_error(world, query: str) -> None:
    personas, *_ = world

    response = export(personas.member, query)

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert list(response.json()) == ["format"]


@pytest.mark.django_db
def test_an_unknown_parameter_or_a_cursor_is_refused(world) -> None:
    personas, *_ = world

    assert export(personas.member, "format=csv&cursor=abc").status_code == 400
    assert list(export(personas.member, "format=csv&sauce=1").json()) == ["sauce"]


@pytest.mark.django_db
def test_the_export_refuses_an_anonymous_caller() -> None:
    assert APIClient().get("/api/events/export/?format=csv").status_code == 401


@pytest.mark.django_db(transaction=True)
async def test_under_asgi_the_body_is_an_async_stream(world) -> None:
    from channels.db import database_sync_to_async

    personas, *_ = world
    key = await database_sync_to_async(lambda: api_key(personas.member))()

    response = await AsyncClient().get(
        "/api/events/export/?format=jsonl", headers={"Authorization": f"Token {key}"}
    )

    assert response.status_code == 200
    assert response.is_async
    lines = [line async for chunk in response.streaming_content for line in chunk.splitlines()]
    # The test client leaves the view thread's connection open (no request_finished).
    await sync_to_async(connections.close_all, thread_sensitive=True)()
    assert len(lines) == 9


@pytest.mark.django_db
def test_the_command_writes_what_the_endpoint_streams(world, tmp_path: Path) -> None:
    personas, source, _second, _other = world
    out = tmp_path / "events.csv"

    call_command(
        "export", "--source", str(source.id), "--format", "csv", "--out", str(out), "--q", "post"
    )

    streamed = body_of(export(personas.member, f"format=csv&source={source.id}&q=post"))
    assert out.read_bytes().decode() == streamed
    assert len(list(csv.DictReader(io.StringIO(streamed)))) == 7
    assert not (tmp_path / "events.csv.partial").exists()


@pytest.mark.django_db
def test_the_command_exports_a_team_by_slug(world, tmp_path: Path) -> None:
    personas, *_ = world
    out = tmp_path / "team.jsonl"

    call_command("export", "--team", personas.team.slug, "--format", "jsonl", "--out", str(out))

    assert len(out.read_text().splitlines()) == 9


@pytest.mark.django_db
def test_the_command_refuses_a_bad_filter_or_no_scope(world, tmp_path: Path) -> None:
    out = str(tmp_path / "x.csv")

    with pytest.raises(CommandError, match="--sentiment"):
        call_command(
            "export", "--team", "newsroom", "--format", "csv", "--out", out, "--sentiment", "meh"
        )
    with pytest.raises(CommandError, match="--source ID or --team"):
        call_command("export", "--format", "csv", "--out", out)
    assert not Path(out).exists()


ROWS = 200_000
BOUND_KIB = 32 * 1024
"""How far an export of ``ROWS`` rows may raise the resident set: materialised, those
rows take several hundred MB (the test measures it)."""


def _bulk_events(source_id: int, template_id: int, count: int) -> None:
    """``count`` copies of the template event with fresh external ids and event times,
    in one INSERT ... SELECT (a second or two for 200,000)."""
    columns = [
        f.column
        for f in Event._meta.concrete_fields
        if f.column not in ("id", "external_id", "created_at")
    ]
    listed = ", ".join(columns)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {Event._meta.db_table} ({listed}, external_id, created_at) "
            f"SELECT {listed}, 'bulk-' || g, created_at - g * interval '1 second' "
            f"FROM {Event._meta.db_table}, generate_series(1, %s) AS g WHERE id = %s",
            [count, template_id],
        )


def _export_in_a_subprocess(args: list[str], call: str = "call_command('export', *args)"):
    """Runs ``manage.py export`` with ``args`` in a child process on the test database;
    returns how far its resident set rose above where it stood before the export (KiB:
    Linux's VmHWM, reset through ``/proc/self/clear_refs`` once Django is set up, less
    VmRSS then) and the command's stderr."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "twiscope.settings_test",
        "DATABASE_URL": child_database_url(),
    }
    script = textwrap.dedent(
        f"""
        import re, sys
        import django
        django.setup()
        from django.core.management import call_command
        def kib(field):
            with open("/proc/self/status") as status:
                return int(re.search(field + r":\\s+(\\d+)", status.read()).group(1))
        args = sys.argv[1:]
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = kib("VmRSS")
        {call}
        print(kib("VmHWM") - before)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return int(done.stdout.split()[-1]), done.stderr


@pytest.mark.django_db(transaction=True)
def test_200k_rows_export_in_constant_memory(tmp_path: Path) -> None:
    personas = make_personas()
    source = make_source(personas.team)
    run_through(source, [envelope(TRICKY)])
    template = Event.objects.get(source=source)
    until = (template.created_at - timedelta(seconds=ROWS - 1001)).isoformat()
    _bulk_events(source.id, template.id, ROWS - 1)
    assert Event.objects.filter(source=source).count() == ROWS
    small, big = tmp_path / "small.csv", tmp_path / "big.csv"

    small_kib, _ = _export_in_a_subprocess(
        ["--source", str(source.id), "--format", "csv", "--out", str(small), "--until", until]
    )
    big_kib, summary = _export_in_a_subprocess(
        ["--source", str(source.id), "--format", "csv", "--out", str(big)]
    )
    jsonl_kib, _ = _export_in_a_subprocess(
        ["--source", str(source.id), "--format", "jsonl", "--out", str(tmp_path / "big.jsonl")]
    )
    # The control: the same rows held in a list, as an export that materialised them would.
    held_kib, _ = _export_in_a_subprocess(
        [str(source.id)],
        call="from ingest.exporting import export_rows; from ingest.models import Event; "
        "rows = list(export_rows(Event.objects.filter(source_id=int(args[0]))))",
    )

    with small.open(newline="") as handle:
        assert sum(1 for _ in csv.reader(handle)) == 1 + 1000
    with big.open(newline="") as handle:
        rows = csv.reader(handle)
        assert next(rows) == list(exporting.CSV_HEADER)
        assert sum(1 for _ in rows) == ROWS
    with (tmp_path / "big.jsonl").open() as handle:
        assert sum(1 for _ in handle) == ROWS
    print(
        f"RSS growth during the export: 1,000 rows {small_kib} KiB; {ROWS:,} rows: csv "
        f"{big_kib} KiB, jsonl {jsonl_kib} KiB; held in a list {held_kib} KiB. {summary.strip()}"
    )
    assert held_kib > BOUND_KIB
    assert big_kib < BOUND_KIB
    assert jsonl_kib < BOUND_KIB
