"""Stories as a resource (issue 20): ``GET /api/stories/`` lists the caller's teams'
stories with their members, terms, forecast and prediction flags, filtered by source
and time; ``/api/trends/`` carries each trend's story and flags. The stories come from
the real persist, enrich and trend stages (``run_through``)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from mlengine.models import Trend
from tests.factories import (
    ORIGIN,
    as_user,
    burst,
    envelope,
    make_personas,
    make_source,
    quiet_history,
    run_through,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("clean_redis")]


def storm_story(team: object) -> list[int]:
    """A source of ``team`` with a "#storm" burst joined by "#hail" (one story)."""
    source = make_source(team)  # type: ignore[arg-type]
    mixed = [
        envelope(f"so much #storm and #hail here {i}", minutes=96 + i * 0.01, author=f"h{i}")
        for i in range(30)
    ]
    return run_through(source, quiet_history(6) + burst("#storm", count=12, minutes=91) + mixed)


def test_a_story_lists_its_members_terms_forecast_and_flags() -> None:
    personas = make_personas()
    storm_story(personas.team)
    first = Trend.objects.get(term="#storm")
    members = Trend.objects.filter(story_id=first.id).order_by("evidence_created_at", "id")
    assert first.story_id == first.id and members.count() >= 2

    response = as_user(personas.member).get("/api/stories/")

    assert response.status_code == 200
    [story] = response.json()["results"]
    assert story["id"] == first.id
    assert story["source"]["id"] == first.source_id
    assert story["terms"] == list(dict.fromkeys(m.term for m in members))
    assert "#hail" in story["terms"]
    assert [m["id"] for m in story["members"]] == [m.id for m in members]
    assert story["events"] == sum(m.events for m in members)
    assert story["forecast"] == (members.last().forecast or {})  # type: ignore[union-attr]
    assert story["confirmed"] is True
    assert isinstance(story["predicted"], bool)


def test_stories_are_scoped_to_the_callers_teams_and_filtered_by_source_and_time() -> None:
    personas = make_personas()
    storm_story(personas.team)
    first = Trend.objects.get(term="#storm")
    member = as_user(personas.member)

    def ids(query: str) -> list[int]:
        response = member.get(f"/api/stories/?{query.replace('+', '%2B')}")
        assert response.status_code == 200, response.content
        return [s["id"] for s in response.json()["results"]]

    assert ids(f"source={first.source_id}") == [first.id]
    assert ids(f"since={(ORIGIN + timedelta(minutes=90)).isoformat()}") == [first.id]
    assert ids(f"until={(ORIGIN + timedelta(minutes=90)).isoformat()}") == []
    assert as_user(personas.outsider).get("/api/stories/").json()["results"] == []
    assert member.get("/api/stories/?source=0").status_code == 400
    assert as_user(personas.outsider).get(f"/api/stories/{first.id}/").status_code == 404


def test_trends_carry_their_story_and_prediction_flags() -> None:
    personas = make_personas()
    storm_story(personas.team)
    first = Trend.objects.get(term="#storm")

    rows = as_user(personas.member).get("/api/trends/?page_size=100").json()["results"]

    by_term = {row["term"]: row for row in rows}
    assert by_term["#storm"]["story"] == first.id
    assert by_term["#hail"]["story"] == first.id
    assert (by_term["#storm"]["predicted"], by_term["#storm"]["confirmed"]) == (
        first.predicted,
        not first.predicted or first.confirmed_at is not None,
    )
