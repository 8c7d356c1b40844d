"""The writes of an anomaly stage run (``mlengine.anomalies.stage``): each series' state
and last bucket, its points, the anomalies opened, grown or closed, and the pruning of
points past ``ANOMALY_RETENTION_S``; in the run's transaction.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from psycopg2.extras import execute_values

from mlengine.anomalies.series import BUCKET_S, Group, Open, Plan, Slot, dump_state
from mlengine.models import Anomaly


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
            if self.points:
                execute_values(
                    cursor.cursor,
                    """
                    INSERT INTO mlengine_seriespoint
                        (series_id, bucket_start, value, expected, low, high, score, anomaly)
                    VALUES %s ON CONFLICT (series_id, bucket_start) DO NOTHING
                    """,
                    self.points,
                    page_size=2000,
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
