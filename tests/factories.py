"""Factory helpers for tests: teams with the three personas, sources, envelopes.

Times are relative to a fixed event-time origin, ``ORIGIN``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from unittest import mock

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from alerts.models import Alert, AlertRule, AlertSequence
from ingest import persistence
from ingest.envelope import Author, Envelope
from ingest.models import Source
from teams.models import Membership, Team

ORIGIN = datetime(2015, 2, 20, 12, 0, tzinfo=UTC)
_ids = itertools.count(1)


@dataclass
class Personas:
    """A team with its owner and member, and an outsider with a team of their own."""

    team: Team
    owner: AbstractBaseUser
    member: AbstractBaseUser
    outsider: AbstractBaseUser
    other_team: Team


def make_user(username: str) -> AbstractBaseUser:
    user = get_user_model().objects.create_user(username=username, password="pw-" + username)
    Token.objects.create(user=user)
    return user


def make_team(slug: str) -> Team:
    return Team.objects.create(name=slug.title(), slug=slug)


def make_personas() -> Personas:
    team = make_team("newsroom")
    other = make_team("rivals")
    owner, member, outsider = make_user("olga"), make_user("mika"), make_user("otto")
    Membership.objects.create(user=owner, team=team, role=Membership.Role.OWNER)
    Membership.objects.create(user=member, team=team, role=Membership.Role.MEMBER)
    Membership.objects.create(user=outsider, team=other, role=Membership.Role.OWNER)
    return Personas(team=team, owner=owner, member=member, outsider=outsider, other_team=other)


def make_source(team: Team, name: str = "archive", bucket_s: int = 900) -> Source:
    return Source.objects.create(
        team=team, kind=Source.Kind.REPLAY, name=name, config={"trend_bucket_s": bucket_s}
    )


def make_rule(team: Team, **fields: object) -> AlertRule:
    defaults: dict[str, object] = {"name": f"rule-{next(_ids)}", "cooldown_s": 3600}
    defaults.update(fields)
    return AlertRule.objects.create(team=team, **defaults)


def envelope(
    text: str,
    *,
    minutes: float = 0,
    author: str | None = None,
    external_id: str | None = None,
) -> Envelope:
    """An envelope posted ``minutes`` after ``ORIGIN``; author and id unique by default."""
    n = next(_ids)
    return Envelope(
        external_id=external_id or f"ev{n}",
        created_at=ORIGIN + timedelta(minutes=minutes),
        text=text,
        author=Author(id=author or f"user{n}", handle=author or f"user{n}"),
    )


def quiet_history(buckets: int, *, per_bucket: int = 10, bucket_min: int = 15) -> list[Envelope]:
    """Background chatter: ``per_bucket`` posts by distinct authors in each bucket."""
    return [
        envelope(f"just another ordinary day at the airport number {i}", minutes=b * bucket_min + i)
        for b in range(buckets)
        for i in range(per_bucket)
    ]


def burst(term: str, *, count: int, minutes: float, authors: int | None = None) -> list[Envelope]:
    """``count`` posts about ``term`` at ``minutes``, by ``authors`` distinct authors.

    The posts hold no other term, so two bursts of different terms are two stories
    (``mlengine.trends.stories``); posts that mix terms make one."""
    n_authors = authors or count
    return [
        envelope(
            f"so much {term} here",
            minutes=minutes + i * 0.01,
            author=f"fan{i % n_authors}",
        )
        for i in range(count)
    ]


@contextmanager
def commits_without_broker() -> Iterator[mock.MagicMock]:
    """Run on-commit side effects inside a test transaction when the block ends, as a
    real commit would, except that tasks are not sent to the broker: the mock of
    ``send_task`` is yielded, to see what would have been queued."""
    from django.test import TestCase

    with (
        mock.patch("twiscope.pipeline.app.send_task") as send_task,
        TestCase.captureOnCommitCallbacks(execute=True),
    ):
        yield send_task


def run_through(
    source: Source, envelopes: list[Envelope], batch_size: int = 100, *, close: bool = True
) -> list[int]:
    """Run ``envelopes`` (sorted by event time) through persist, enrich and trends as
    plain calls, batch by batch, each batch declaring its last event time as the
    source's watermark, as a replay does; with ``close`` the stream is then declared
    complete. On-commit side effects run as the stages' commits would run them, except
    that nothing is sent to the broker (the test runs each stage itself). Returns the
    ids of the new trends."""
    from mlengine.enrichment import stage as enrichment
    from mlengine.trends import stage as trend_stage

    def one(batch: list[Envelope], watermark: datetime | None) -> list[int]:
        with commits_without_broker():
            key = persistence.stage_batch(source_id=source.id, envelopes=batch, watermark=watermark)
            ids = persistence.persist_batch(batch_key=key, source_id=source.id).inserted_ids
            enrichment.enrich_events(event_ids=ids, source_id=source.id)
            return trend_stage.advance_stream(source_id=source.id)

    trend_ids: list[int] = []
    for i in range(0, len(envelopes), batch_size):
        batch = envelopes[i : i + batch_size]
        trend_ids += one(batch, batch[-1].created_at)
    if close and envelopes:
        trend_ids += one([], max(e.created_at for e in envelopes) + timedelta(microseconds=1))
    return trend_ids


def fire_blizzard_alerts(team: Team) -> list[int]:
    """A source, a rule, and a "#blizzard" and a "#flood" burst (two stories) after six
    quiet buckets, run through every stage up to the alerts; returns the new alert ids
    (not yet pushed)."""
    from alerts import evaluation

    source = make_source(team)
    make_rule(team)
    trend_ids = run_through(
        source,
        quiet_history(6)
        + burst("#blizzard", count=12, minutes=91)
        + burst("#flood", count=12, minutes=92),
    )
    return evaluation.evaluate_trends(trend_ids=trend_ids)


def make_alerts(team: Team, count: int) -> list[int]:
    """``count`` committed alerts of ``team`` (under a new rule) with its next sequence
    numbers, its sequence row locked until commit as the alerts stage locks it; not yet
    pushed. Returns their ids in ``seq`` order."""
    rule = make_rule(team)
    with transaction.atomic():
        sequence, _ = AlertSequence.objects.select_for_update().get_or_create(team=team)
        first = sequence.last_seq + 1
        AlertSequence.objects.filter(team=team).update(last_seq=F("last_seq") + count)
        now = timezone.now()
        created = Alert.objects.bulk_create(
            Alert(
                team=team,
                rule=rule,
                seq=first + i,
                title=f"alert {first + i}",
                severity="info",
                evidence={},
                event_received_at=now,
                event_created_at=now,
                created_at=now,
            )
            for i in range(count)
        )
    return [alert.id for alert in created]


def child_database_url() -> str:
    """The ``DATABASE_URL`` of the test database, for a child process (a command run as
    ``manage.py`` would run it) that must see the rows a transactional test committed."""
    from django.db import connection

    db = connection.settings_dict
    host, port = db["HOST"] or "127.0.0.1", db["PORT"] or 5432
    return f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{host}:{port}/{db['NAME']}"


def token_client(user: AbstractBaseUser) -> APIClient:
    """An API client authenticated with ``user``'s token."""
    from rest_framework.authtoken.models import Token

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get(user_id=user.pk).key}")
    return client
