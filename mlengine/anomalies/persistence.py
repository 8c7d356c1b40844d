"""The writes of an anomaly stage run (``mlengine.anomalies.stage``): each series' state
and last bucket, its points, the anomalies opened, grown or closed, and the pruning of
points past ``ANOMALY_RETENTION_S``; in the run's transaction.
"""

from __future__ import annotations

import io
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.backends.utils import CursorWrapper
from psycopg2.extras import execute_values

from mlengine.anomalies.series import BUCKET_S, Group, Open, Plan, Slot, dump_state
from mlengine.models import Anomaly

POINT_COLUMNS = "series_id, bucket_start, value, expected, low, high, score, anomaly"
COPY_FROM = 2000
"""Points a run writes with one ``INSERT``; more (a run that jumps past two weeks writes
two weeks of points per series) go through ``COPY`` (``copy_points``)."""


def copy_points(cursor: CursorWrapper, points: list[tuple[Any, ...]]) -> None:
    """Insert ``points`` (rows of ``POINT_COLUMNS``) through a temporary table filled by
    ``COPY`` (about twice as fast as ``execute_values``, whose per-row quoting dominates),
    skipping those that exist (``ON CONFLICT DO NOTHING``, as the ``INSERT``). Floats are
    written as ``repr`` writes them, which reads back to the same float64 (as
    psycopg2's own quoting). Three statements; the table is dropped at commit."""
    text = io.StringIO()
    for row in points:
        text.write("\t".join(_copy_field(v) for v in row))
        text.write("\n")
    text.seek(0)
    cursor.execute(
        "CREATE TEMP TABLE IF NOT EXISTS anomaly_points (series_id bigint, "
        "bucket_start timestamptz, value float8, expected float8, low float8, high float8, "
        "score float8, anomaly boolean) ON COMMIT DROP"
    )
    cursor.cursor.copy_expert(f"COPY anomaly_points ({POINT_COLUMNS}) FROM STDIN", text)
    cursor.execute(
        f"WITH moved AS (DELETE FROM anomaly_points RETURNING {POINT_COLUMNS}) "
        f"INSERT INTO mlengine_seriespoint ({POINT_COLUMNS}) SELECT {POINT_COLUMNS} FROM moved "
        "ON CONFLICT (series_id, bucket_start) DO NOTHING"
    )


def _copy_field(value: Any) -> str:
    """A value in ``COPY``'s text format (the points' fields: ids, times, floats, flags)."""
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, datetime):
        return value.isoformat()
    return repr(value)


class RunWrites:
    """The writes of a run, mixed into the stage's run (``stage._Run``), which fills
    these attributes as it steps."""

    now: datetime
    bucket: timedelta
    groups: dict[str, Group]
    slots: list[Slot]
    points: list[tuple[Any, ...]]
    opens: dict[int, Open]
    updated_ids: list[int]
    plans: list[Plan]

    def save(self) -> list[int]:
        """Write the series, points and anomalies; prune old points; return the ids of
        the anomalies this run opened."""
        final: dict[int, Slot] = {}
        for slot in self.slots:
            if slot.last_bucket is not None or not slot.active:
                final[slot.series_id] = slot  # a later slot of a series wins
        # One copy of each group's state, whose rows are then saved one by one (a copy
        # per series made a beat quadratic in the series: bench/anomaly_stage.py).
        states = {
            name: group.detector.state()
            for name, group in self.groups.items()
            if group.detector is not None
        }
        updates = []
        for series_id, slot in sorted(final.items()):
            state = dump_state(states[slot.group], slot.row) if slot.active else None
            updates.append((series_id, slot.active, slot.last_bucket, state))
        with connection.cursor() as cursor:
            if updates:
                execute_values(
                    cursor.cursor,
                    """
                    UPDATE mlengine_series AS s SET
                        active = v.active,
                        last_bucket = COALESCE(v.last_bucket, s.last_bucket),
                        state = v.state
                    FROM (VALUES %s) AS v(id, active, last_bucket, state)
                    WHERE s.id = v.id
                    """,
                    updates,
                    template="(%s::bigint, %s::boolean, %s::timestamptz, %s::bytea)",
                )
            if len(self.points) > COPY_FROM:
                copy_points(cursor, self.points)
            elif self.points:
                execute_values(
                    cursor.cursor,
                    f"INSERT INTO mlengine_seriespoint ({POINT_COLUMNS}) VALUES %s "
                    "ON CONFLICT (series_id, bucket_start) DO NOTHING",
                    self.points,
                    page_size=COPY_FROM,
                )
        new_ids = self._save_anomalies()
        retention = timedelta(seconds=settings.ANOMALY_RETENTION_S)
        with connection.cursor() as cursor:
            for plan in self.plans:
                cutoff = plan.start + (plan.n - 1) * self.bucket - retention
                cursor.execute(
                    """
                    DELETE FROM mlengine_seriespoint p USING mlengine_series s
                    WHERE p.series_id = s.id AND s.source_id = %s AND p.bucket_start < %s
                    """,
                    [plan.source_id, cutoff],
                )
        return new_ids

    def _save_anomalies(self) -> list[int]:
        """Update the anomalies read back that changed; insert the new ones (conflict-
        ignore); return the new ids."""
        new_rows = []
        for opened in self.opens.values():
            if opened.id is not None:
                self.updated_ids.append(opened.id)
                Anomaly.objects.filter(id=opened.id).update(
                    window_end=opened.window_end,
                    peak_at=opened.peak_at,
                    score=opened.score,
                    value=opened.value,
                    expected=opened.expected,
                    low=opened.low,
                    high=opened.high,
                    closed=opened.closed,
                    updated_at=self.now,
                )
                continue
            new_rows.append(
                (
                    opened.series_id,
                    opened.source_id,
                    opened.window_start,
                    opened.window_end,
                    BUCKET_S,
                    opened.peak_at,
                    opened.score,
                    opened.value,
                    opened.expected,
                    opened.low,
                    opened.high,
                    opened.closed,
                    opened.evidence_created_at,
                    opened.evidence_received_at,
                    self.now,
                    self.now,
                )
            )
        if not new_rows:
            return []
        with connection.cursor() as cursor:
            returned = execute_values(
                cursor.cursor,
                """
                INSERT INTO mlengine_anomaly (
                    series_id, source_id, window_start, window_end, bucket_s, peak_at, score,
                    value, expected, low, high, closed, evidence_created_at,
                    evidence_received_at, detected_at, updated_at
                ) VALUES %s
                ON CONFLICT (series_id, window_start) DO NOTHING
                RETURNING id
                """,
                new_rows,
                fetch=True,
            )
        return sorted(row[0] for row in returned)
