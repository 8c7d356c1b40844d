"""``evaluate trends --crisislex``: the metrics, and the detector on a slice of CrisisLexT26."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from mlengine.evaluation import crisislex
from tests.factories import ORIGIN

SLICE = ("2013_LA_airport_shootings", "2013_NY_train_crash")


def post(n: int, hours: float, text: str) -> crisislex.Post:
    return crisislex.Post(
        id=n,
        external_id=str(n),
        created_at=ORIGIN + timedelta(hours=hours),
        author=f"?{n}",
        terms=(),
        text=text,
    )


EVENT = crisislex.CrisisEvent(
    name="quake",
    posts=(
        post(1, 0.5, "nice weather"),
        post(2, 1.0, "Big EARTHQUAKE in Chile"),
        post(3, 3.1, "chile earthquake damage"),
        post(4, 3.2, "earthquake chile help"),
        post(5, 3.9, "relief"),
    ),
    keywords=("#chile earthquake", "Chile quake"),
    keyword_words=frozenset({"chile", "earthquake", "quake"}),
)


def test_the_metrics_count_from_the_first_post_holding_a_whole_keyword() -> None:
    alerts = [
        crisislex.Alert(at=ORIGIN + timedelta(hours=2), terms=("weather",)),
        crisislex.Alert(at=ORIGIN + timedelta(hours=2.5), terms=("#Earthquake", "help")),
    ]

    row = crisislex.metrics(EVENT, alerts)

    assert crisislex.onset(EVENT) == ORIGIN + timedelta(hours=1)
    assert row == {
        "name": "quake",
        "alerts": 2,
        "first_alert_delay_h": 1.5,
        "keyword_precision": 0.5,
        "peak_lead_h": 1.0,
    }


def test_an_event_without_alerts_has_no_delay_precision_or_lead() -> None:
    row = crisislex.metrics(EVENT, [])

    assert (row["alerts"], row["first_alert_delay_h"], row["keyword_precision"]) == (0, None, None)
    assert row["peak_lead_h"] is None


def test_the_command_refuses_a_folder_that_is_not_crisislex(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="no <event>/<event>-tweets_labeled"):
        call_command("evaluate", "trends", "--crisislex", str(tmp_path))


@pytest.fixture(autouse=True)
def production_history(settings: Any) -> None:
    """The figures are production's: no history required (``TRENDS_MIN_HISTORY_BUCKETS``
    is 0 in twiscope/settings.py; the test settings pin 3 for the other tests)."""
    settings.TRENDS_MIN_HISTORY_BUCKETS = 0


@pytest.fixture(scope="module")
def crisis_slice(shared_data: Path) -> list[crisislex.CrisisEvent]:
    root = shared_data / "crisislex_t26"
    return [crisislex.load_event(root / name) for name in SLICE]


def test_stories_fire_fewer_alerts_than_terms_on_real_crises(
    crisis_slice: list[crisislex.CrisisEvent],
) -> None:
    terms = crisislex.evaluate(Path("."), detector="terms", events=crisis_slice)
    stories = crisislex.evaluate(Path("."), detector="stories", events=crisis_slice)

    # LA and NY burst in their first bucket: one story each, naming the event's own
    # keywords, where one alert per term fires 50 and 43.
    assert [r["alerts"] for r in terms["events"]] == [50, 43]
    assert [r["alerts"] for r in stories["events"]] == [1, 1]
    assert [r["first_alert_delay_h"] for r in stories["events"]] == [7.92, 0.2]
    assert [r["keyword_precision"] for r in stories["events"]] == [1.0, 1.0]
    assert stories["median_alerts"] == 1
    assert [r["bucket_s"] for r in stories["events"]] == [21600, 21600]


def test_the_command_writes_the_figures_of_each_event(shared_data: Path, tmp_path: Path) -> None:
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / SLICE[1]).symlink_to(shared_data / "crisislex_t26" / SLICE[1])
    out = tmp_path / "cl.json"

    call_command("evaluate", "trends", "--crisislex", str(tmp_path / "events"), "--json", str(out))

    result = json.loads(out.read_text())
    assert result["median_alerts"] == 1
    assert result["median_first_alert_delay_h"] == result["events"][0]["first_alert_delay_h"]
    assert {"name", "alerts", "first_alert_delay_h", "keyword_precision", "peak_lead_h"} <= set(
        result["events"][0]
    )
