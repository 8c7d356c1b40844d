"""Periodic jobs (Celery beat). Each selects ids and fans out; each has an expiry."""

from __future__ import annotations

from typing import Any

BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    "ingest.sweep_stuck_events": {
        "task": "ingest.sweep_stuck_events",
        "schedule": 30.0,
        "options": {"expires": 25},
    },
    "ingest.analyze_growing_tables": {
        "task": "ingest.analyze_growing_tables",
        "schedule": 60.0,
        "options": {"expires": 55},
    },
    "ml.advance_idle_watermarks": {
        "task": "ml.advance_idle_watermarks",
        "schedule": 15.0,
        "options": {"expires": 14},
    },
}
