"""The queues are defined once (twiscope.queues), and every task runs on one of them."""

from __future__ import annotations

from twiscope.celery import app
from twiscope.pipeline import ENTRY_TASKS, NEXT_STAGE
from twiscope.queues import NAMES, STAGES
from twiscope.schedules import BEAT_SCHEDULE


def _queue_of(task_name: str) -> str:
    route = app.amqp.router.route({}, task_name, (), {})
    return str(route["queue"].name)


def test_every_project_task_runs_on_the_queue_its_name_starts_with() -> None:
    app.loader.import_default_modules()
    ours = sorted(name for name in app.tasks if not name.startswith("celery."))

    queues = {name: _queue_of(name) for name in ours}

    assert len(ours) > 10
    assert queues == {name: name.split(".", 1)[0] for name in ours}
    assert set(queues.values()) == set(NAMES)


def test_the_chain_of_stages_runs_ingest_enrich_detect_alerts() -> None:
    assert STAGES == ("ingest", "enrich", "detect", "alerts")
    assert NEXT_STAGE == {"ingest": "enrich", "enrich": "detect", "detect": "alerts"}
    assert {stage: _queue_of(task) for stage, task in ENTRY_TASKS.items()} == {
        stage: stage for stage in ENTRY_TASKS
    }


def test_every_periodic_task_is_a_registered_task_on_a_defined_queue() -> None:
    app.loader.import_default_modules()

    tasks = {entry["task"] for entry in BEAT_SCHEDULE.values()}

    assert tasks <= set(app.tasks)
    assert {_queue_of(task) for task in tasks} <= set(NAMES)
