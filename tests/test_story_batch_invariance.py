"""Stories are a function of the events alone, whatever the batches the trend stage
takes them in: one real CrisisLexT26 event replayed through the real persist, enrich,
trend and story stages in batches of 5,000 and of 40 posts gives the same trends, the same
stories (always-on terms included) and the same alerts (``make chaos`` compares a
paced, faulted run with a full-speed one in the same way)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from alerts import evaluation
from alerts.models import Alert
from ingest.envelope import Author, Envelope
from mlengine.evaluation.crisislex import load_event
from mlengine.models import Trend
from tests.factories import make_personas, make_rule, make_source, run_through

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("clean_redis")]


def stories_of(source_id: int) -> set[frozenset[str]]:
    members: dict[int, set[str]] = defaultdict(set)
    for term, story_id in Trend.objects.filter(source_id=source_id).values_list("term", "story_id"):
        members[story_id if story_id is not None else -1].add(term)
    return {
        frozenset(terms) | ({"<none>"} if key == -1 else set()) for key, terms in members.items()
    }


def test_stories_and_alerts_do_not_depend_on_the_batches(shared_data: Path) -> None:
    event = load_event(shared_data / "crisislex_t26" / "2012_Colorado_wildfires")
    # Four copies of each post (the same millisecond, another id and author), as
    # ``make chaos`` loops the archive: enough volume for the event's own words to
    # become always on in its stream.
    envelopes = sorted(
        (
            Envelope(
                external_id=str(int(p.external_id) + copy),
                created_at=p.created_at,
                text=p.text,
                author=Author(id=f"{p.author}-{copy}", handle=f"{p.author}-{copy}"),
            )
            for p in event.posts
            for copy in range(4)
        ),
        key=lambda e: (e.created_at, e.external_id),
    )
    personas = make_personas()
    make_rule(personas.team, cooldown_s=0)
    found = {}
    for size in (5000, 40):  # make chaos: full speed, then paced
        source = make_source(personas.team, name=f"batches-{size}", bucket_s=6 * 3600)
        ids = run_through(source, envelopes, batch_size=size)
        created = evaluation.evaluate_trends(trend_ids=ids)
        found[size] = (
            sorted(
                Trend.objects.filter(source=source).values_list("term", "bucket_start", "always_on")
            ),
            stories_of(source.id),
            sorted(
                Alert.objects.filter(id__in=created).values_list(
                    "trend__term", "trend__bucket_start"
                )
            ),
        )
    assert found[5000][0] == found[40][0]
    assert any(always_on for _, _, always_on in found[5000][0])
    assert found[5000][1] == found[40][1]
    assert found[5000][2] == found[40][2]
