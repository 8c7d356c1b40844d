"""The pipeline statistics of ``/api/stats/``."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import connection
from django.db.models import Sum

from ingest.models import DeadLetter, Source
from ingest.services import events_rate_name
from teams.selectors import team_ids_for
from twiscope.pipeline import queue_depths
from twiscope.redis import rate_total

LATENCY_WINDOW = 1000


def stats_for(user: AbstractBaseUser | AnonymousUser) -> dict[str, Any]:
    """The numbers of ``GET /api/stats/`` for the teams of ``user``.

    Returns ``events_total`` (events stored), ``events_per_s`` (events stored in the
    last 60 s of processing time, per second, from a rolling counter in Redis),
    ``queue_lag`` (messages waiting per
    queue: the broker is shared by all teams), ``alert_latency_ms`` (``p50``, ``p95``,
    ``p99`` of ``pushed_at − event_received_at`` over the team's last 1,000 pushed
    alerts, and ``n``), ``dead_letters_total`` and ``sources_total``.
    """
    teams = team_ids_for(user)
    sources = Source.objects.filter(team_id__in=teams)
    events_total = sources.aggregate(total=Sum("events_total"))["total"] or 0
    team_list = list(teams.values_list("team_id", flat=True))
    last_minute = rate_total([events_rate_name(team_id) for team_id in team_list], seconds=60)
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY ms), count(*)
            FROM (
                SELECT extract(epoch FROM pushed_at - event_received_at) * 1000 AS ms
                FROM alerts_alert
                WHERE team_id = ANY(%s) AND pushed_at IS NOT NULL
                ORDER BY id DESC LIMIT %s
            ) recent
            """,
            [team_list, LATENCY_WINDOW],
        )
        percentiles, n = cursor.fetchone()
    p50, p95, p99 = (round(float(p), 1) for p in percentiles) if percentiles else (None,) * 3
    return {
        "events_total": int(events_total),
        "events_per_s": round(last_minute / 60, 2),
        "queue_lag": queue_depths(),
        "alert_latency_ms": {"p50": p50, "p95": p95, "p99": p99, "n": int(n)},
        "dead_letters_total": DeadLetter.objects.filter(source__team_id__in=teams).count(),
        "sources_total": sources.count(),
    }
