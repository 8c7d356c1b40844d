"""Keep planner statistics of the fast-growing tables fresh.

A replay or a burst inserts tens of thousands of events in seconds. With the default
autovacuum_analyze_scale_factor (10% of the table) the statistics lag behind, and the
events list query chose a plan that sorts every event of the team's sources (22 ms on
29,000 events, growing with the table) instead of walking the event-time index
(0.2 ms). Analyzing after every 2% of new rows (at least 1,000) keeps the good plan.
"""

from __future__ import annotations

from django.db import migrations

TABLES = ("ingest_event", "mlengine_termcount", "mlengine_trend")


class Migration(migrations.Migration):
    dependencies = [
        ("ingest", "0002_event_uncounted"),
        ("mlengine", "0001_initial"),
    ]

    operations = [
        migrations.RunSQL(
            sql=[
                f"ALTER TABLE {table} SET (autovacuum_analyze_scale_factor = 0.02,"
                " autovacuum_analyze_threshold = 1000)"
                for table in TABLES
            ],
            reverse_sql=[
                f"ALTER TABLE {table} RESET (autovacuum_analyze_scale_factor,"
                " autovacuum_analyze_threshold)"
                for table in TABLES
            ],
        )
    ]
