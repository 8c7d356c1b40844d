"""Periodic jobs (Celery beat). Each selects ids and fans out; each has an expiry.

Each stage sweeps its own stuck work (``<stage>.sweep``); see ``twiscope.pipeline``.
"""

from __future__ import annotations

from typing import Any

SWEEP_EVERY_S = 15.0
"""Seconds between two sweeps of a stage: with ``PIPELINE_STUCK_AFTER_S`` (30 s), lost
work is sent again within about 45 s."""

BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    "ingest.sweep": {"task": "ingest.sweep", "schedule": SWEEP_EVERY_S, "options": {"expires": 14}},
    "ingest.declare_live_progress": {
        "task": "ingest.declare_live_progress",
        "schedule": 5.0,
        "options": {"expires": 4},
    },
    "ingest.analyze_growing_tables": {
        "task": "ingest.analyze_growing_tables",
        "schedule": 60.0,
        "options": {"expires": 55},
    },
    "enrich.sweep": {"task": "enrich.sweep", "schedule": SWEEP_EVERY_S, "options": {"expires": 14}},
    "detect.sweep": {"task": "detect.sweep", "schedule": SWEEP_EVERY_S, "options": {"expires": 14}},
    "anomalies.advance": {
        "task": "anomalies.advance",
        "schedule": 30.0,
        "options": {"expires": 25},
    },
    "alerts.sweep": {"task": "alerts.sweep", "schedule": SWEEP_EVERY_S, "options": {"expires": 14}},
    "notify.sweep": {"task": "notify.sweep", "schedule": SWEEP_EVERY_S, "options": {"expires": 14}},
}
