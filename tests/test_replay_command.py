"""``manage.py replay``: batches, watermarks, event-time order, pacing, dead letters,
the progress bar, the summary and ``--wait``.

The hand-off to the queue (``enqueue_envelopes``) and the end-of-stream signal are
captured; sources, teams and dead letters are real rows. ``--wait`` is tested with the
persist stage run synchronously on each batch (``synchronous_ingest``) and, at the end,
through a real Celery worker.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from pytest_django.fixtures import Settings

from ingest import counters, persistence
from ingest.envelope import Envelope
from ingest.models import DeadLetter, Event, Source
from ingest.replaying import FLUSH_WINDOW_S, Outcome, paced_batches
from teams.models import Team
from tests.factories import commits_without_broker, make_team
from twiscope import celery, pipeline

pytestmark = pytest.mark.django_db

SAMPLES = Path(__file__).resolve().parent / "samples"
ORIGIN = datetime(2024, 10, 17, 14, 0, tzinfo=UTC)


@dataclass
class Captured:
    """What the command handed to the pipeline."""

    batches: list[list[Envelope]] = field(default_factory=list)
    watermarks: list[datetime | None] = field(default_factory=list)
    ends: list[tuple[int, datetime]] = field(default_factory=list)

    @property
    def envelopes(self) -> list[Envelope]:
        return [envelope for batch in self.batches for envelope in batch]


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Captured:
    sink = Captured()

    def enqueue(
        *, source: Source, envelopes: list[Envelope], watermark: datetime | None = None
    ) -> str:
        sink.batches.append(list(envelopes))
        sink.watermarks.append(watermark)
        return f"batch-{len(sink.batches)}"

    def end_of_stream(*, source: Source, event_time: datetime) -> None:
        sink.ends.append((source.id, event_time))

    monkeypatch.setattr(celery, "missing_consumers", lambda *a, **k: set())
    monkeypatch.setattr(persistence, "enqueue_envelopes", enqueue)
    monkeypatch.setattr(persistence, "end_of_stream", end_of_stream)
    return sink


@pytest.fixture
def team() -> Team:
    return make_team("newsroom")


@pytest.fixture
def synchronous_ingest(
    captured: Captured, monkeypatch: pytest.MonkeyPatch, clean_redis: None
) -> Captured:
    """The persist stage run on each batch as it is sent (real staging, real
    conflict-ignore inserts and dead letters, its on-commit effects run without a
    broker); the drain's predicates report an empty pipeline."""

    def enqueue(
        *, source: Source, envelopes: list[Envelope], watermark: datetime | None = None
    ) -> str:
        captured.batches.append(list(envelopes))
        captured.watermarks.append(watermark)
        with commits_without_broker():
            key = persistence.stage_batch(
                source_id=source.id, envelopes=envelopes, watermark=watermark
            )
            persistence.persist_batch(batch_key=key, source_id=source.id)
        return key

    monkeypatch.setattr(persistence, "enqueue_envelopes", enqueue)
    monkeypatch.setattr(counters, "in_flight_events", lambda source_id, **_: 0)
    monkeypatch.setattr(pipeline, "is_idle", lambda: True)
    return captured


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as an interactive stderr does."""

    def isatty(self) -> bool:
        return True


def replay(*args: str) -> str:
    """Run the command; return its stdout."""
    out = io.StringIO()
    call_command("replay", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def replay_err(*args: str, stderr: io.StringIO) -> str:
    """Run the command with ``stderr``; return its stdout."""
    out = io.StringIO()
    call_command("replay", *args, stdout=out, stderr=stderr)
    return out.getvalue()


def broken_airline_file(tmp_path: Path) -> Path:
    path = tmp_path / "airline.csv"
    lines = (SAMPLES / "airline.csv").read_text().splitlines(keepends=True)
    path.write_text(
        "".join(lines)
        + "569587242672390004,neutral,1.0,,,United,,a,,0,hi,,last Tuesday,,\n"
        + ",neutral,1.0,,,United,,b,,0,no id,,2015-02-22 11:00:00 -0800,,\n"
        + "569587242672390006,neutral,1.0,,,United,,c,,0,bad when,,2015-02-30 11:00:00 -0800,,\n"
    )
    return path


def test_it_enqueues_the_archive_in_batches_of_the_configured_size(
    team: Team, captured: Captured, settings: Settings
) -> None:
    settings.INGEST_BATCH_SIZE = 2

    replay(str(SAMPLES / "x_v2.jsonl"))

    assert [len(batch) for batch in captured.batches] == [2, 2, 1]


def test_it_replays_in_event_time_order_whatever_the_file_order(
    team: Team, captured: Captured, settings: Settings
) -> None:
    settings.INGEST_BATCH_SIZE = 2

    replay(str(SAMPLES / "telegram.json"))  # newest first in the file

    assert [e.external_id for e in captured.envelopes] == [
        "-1001234567890/5010",
        "-1001234567890/5011",
        "-1001234567890/5012",
    ]


def test_each_batch_declares_its_last_event_time_as_the_watermark(
    team: Team, captured: Captured, settings: Settings
) -> None:
    settings.INGEST_BATCH_SIZE = 2

    replay(str(SAMPLES / "x_v2.jsonl"))

    assert captured.watermarks == [batch[-1].created_at for batch in captured.batches]
    assert captured.watermarks == sorted(captured.watermarks)
    assert len(set(captured.watermarks)) == 3


def test_it_tells_the_trend_stage_the_stream_ended_at_the_last_event(
    team: Team, captured: Captured
) -> None:
    replay(str(SAMPLES / "x_v1.jsonl"))
    source = Source.objects.get(team=team, name="x_v1")

    assert captured.ends == [(source.id, datetime(2018, 10, 10, 20, 25, 47, tzinfo=UTC))]


def test_it_creates_a_replay_source_named_after_the_file(team: Team, captured: Captured) -> None:
    replay(str(SAMPLES / "trump.csv"))
    source = Source.objects.get(team=team, name="trump")

    assert source.kind == Source.Kind.REPLAY
    assert source.config["path"] == str((SAMPLES / "trump.csv").resolve())
    assert source.config["format"] == "trump_csv"


def test_it_reuses_the_source_on_a_second_replay(team: Team, captured: Captured) -> None:
    replay(str(SAMPLES / "trump.csv"), "--source", "archive")
    replay(str(SAMPLES / "airline.csv"), "--source", "archive")

    assert Source.objects.filter(team=team).count() == 1
    assert Source.objects.get().name == "archive"
    assert len(captured.envelopes) == 6


def test_it_summarises_what_it_sent_and_says_the_pipeline_is_still_working(
    team: Team, captured: Captured
) -> None:
    out = replay(str(SAMPLES / "x_v2.jsonl"))
    source = Source.objects.get(name="x_v2")
    sent, pending = out.splitlines()

    assert sent.startswith(
        f'replay x_v2.jsonl (x_v2_jsonl) into source "x_v2" (id {source.id}): '
        "read 5, enqueued 5 in 1 batches, skipped 0, "
    )
    assert sent.endswith(" s")
    assert pending.startswith("sent 5 events (not yet stored: the pipeline is still working")
    assert "pass --wait" in pending


def test_it_dead_letters_each_bad_row_and_summarises_the_reasons(
    team: Team, captured: Captured, tmp_path: Path
) -> None:
    path = broken_airline_file(tmp_path)

    out = replay(str(path))
    source = Source.objects.get(name="airline")
    letters = list(DeadLetter.objects.order_by("id"))

    assert [e.external_id for e in captured.envelopes] == [
        "569587242672398003",
        "570301130888120002",
        "570306133677760001",
    ]
    assert "read 6, enqueued 3 in 1 batches, skipped 3 (bad time 2, missing id 1)" in out
    assert [(d.stage, d.source_id, d.payload["line"]) for d in letters] == [
        ("replay", source.id, 6),
        ("replay", source.id, 7),
        ("replay", source.id, 8),
    ]
    assert letters[1].reason == "missing id: tweet_id is empty"
    assert letters[1].payload["raw"].startswith(",neutral,1.0")
    assert letters[1].payload["format"] == "airline_csv"


def test_it_stops_after_limit_rows_read(team: Team, captured: Captured, tmp_path: Path) -> None:
    out = replay(str(broken_airline_file(tmp_path)), "--limit", "4")

    assert "read 4, enqueued 3 in 1 batches, skipped 1 (bad time 1)" in out
    assert DeadLetter.objects.count() == 1


def test_a_paced_replay_enqueues_in_event_time_order_and_ends_the_stream(
    team: Team, captured: Captured, settings: Settings
) -> None:
    settings.INGEST_BATCH_SIZE = 2

    replay(str(SAMPLES / "x_v2.jsonl"), "--speed", "100000")

    times = [e.created_at for e in captured.envelopes]
    assert times == sorted(times)
    assert len(times) == 5
    assert max(len(batch) for batch in captured.batches) <= 2
    assert captured.ends[0][1] == times[-1]


def test_it_replays_an_undetectable_file_when_told_its_format(
    team: Team, captured: Captured, tmp_path: Path
) -> None:
    path = tmp_path / "empty_messages.json"
    path.write_text("[]")

    out = replay(str(path), "--format", "telegram_json")

    assert "read 0, enqueued 0 in 0 batches, skipped 0" in out
    assert captured.ends == []


def test_it_refuses_a_missing_file(team: Team, captured: Captured, tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="no such file"):
        replay(str(tmp_path / "nothing.csv"))


def test_it_refuses_a_file_whose_format_it_cannot_tell(
    team: Team, captured: Captured, tmp_path: Path
) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("shopping,list\nmilk,eggs\n")

    with pytest.raises(CommandError, match="pass --format"):
        replay(str(path))


@pytest.mark.parametrize("speed", ["0", "-2", "fast", "inf"])
def test_it_refuses_a_speed_that_is_not_positive_or_max(
    team: Team, captured: Captured, speed: str
) -> None:
    with pytest.raises(CommandError, match="--speed"):
        replay(str(SAMPLES / "x_v1.jsonl"), "--speed", speed)


def test_it_uses_the_team_named_by_slug(captured: Captured) -> None:
    make_team("alpha")
    beta = make_team("beta")

    replay(str(SAMPLES / "x_v1.jsonl"), "--team", "beta")

    assert Source.objects.get().team == beta


def test_it_asks_which_team_when_there_are_several(captured: Captured) -> None:
    make_team("alpha")
    make_team("beta")

    with pytest.raises(
        CommandError, match=r"pass --team with one of: alpha, beta \(or set TWISCOPE_TEAM\)"
    ):
        replay(str(SAMPLES / "x_v1.jsonl"))


def test_with_several_teams_it_replays_into_the_demo_team_and_says_so(
    captured: Captured,
) -> None:
    """``make run`` creates the demo team; a second team (``create_user --create-team``)
    must not break the README's replay commands, typed without ``--team``."""
    make_team("desk")
    demo = make_team("demo")
    err = io.StringIO()

    replay_err(str(SAMPLES / "x_v1.jsonl"), stderr=err)

    assert Source.objects.get().team == demo
    assert err.getvalue().splitlines()[0] == (
        'replay into team "Demo" (demo): the team make run creates, of 2 teams; '
        "pick another with --team SLUG or TWISCOPE_TEAM=SLUG"
    )


def test_twiscope_team_picks_the_team_when_no_slug_is_given(
    captured: Captured, settings: Settings
) -> None:
    make_team("demo")
    desk = make_team("desk")
    settings.TWISCOPE_TEAM = "desk"
    err = io.StringIO()

    replay_err(str(SAMPLES / "x_v1.jsonl"), stderr=err)

    assert Source.objects.get().team == desk
    assert 'replay into team "Desk" (desk): set by TWISCOPE_TEAM' in err.getvalue()


def test_a_slug_given_wins_over_twiscope_team(captured: Captured, settings: Settings) -> None:
    beta = make_team("beta")
    make_team("desk")
    settings.TWISCOPE_TEAM = "desk"

    replay(str(SAMPLES / "x_v1.jsonl"), "--team", "beta")

    assert Source.objects.get().team == beta


def test_an_unknown_twiscope_team_is_named_as_such(captured: Captured, settings: Settings) -> None:
    make_team("demo")
    settings.TWISCOPE_TEAM = "ghost"

    with pytest.raises(CommandError, match=r"'ghost' \(set by TWISCOPE_TEAM\) \(teams: demo\)"):
        replay(str(SAMPLES / "x_v1.jsonl"))


def test_the_only_team_is_used_without_a_word(team: Team, captured: Captured) -> None:
    err = io.StringIO()

    replay_err(str(SAMPLES / "x_v1.jsonl"), stderr=err)

    assert Source.objects.get().team == team
    assert "team" not in err.getvalue()


def test_it_names_the_teams_when_the_slug_is_unknown(team: Team, captured: Captured) -> None:
    with pytest.raises(CommandError, match=r"no team with slug 'ghost' \(teams: newsroom\)"):
        replay(str(SAMPLES / "x_v1.jsonl"), "--team", "ghost")


def test_it_refuses_a_disabled_source_rather_than_send_batches_that_would_be_dropped(
    team: Team, captured: Captured
) -> None:
    Source.objects.create(
        team=team,
        kind=Source.Kind.REPLAY,
        name="x_v1",
        enabled=False,
        disabled_reason="paused by ops",
    )

    with pytest.raises(CommandError, match=r'"x_v1" \(id \d+\) is disabled: paused by ops'):
        replay(str(SAMPLES / "x_v1.jsonl"))

    assert captured.batches == []


def test_it_refuses_a_source_name_held_by_another_kind(team: Team, captured: Captured) -> None:
    Source.objects.create(team=team, kind=Source.Kind.RSS, name="x_v1")

    with pytest.raises(CommandError, match="exists with kind 'rss'"):
        replay(str(SAMPLES / "x_v1.jsonl"))


# --- Pacing, on a fake clock ------------------------------------------------------------


class FakeClock:
    """A monotonic clock that moves only when slept on."""

    def __init__(self) -> None:
        self.now = 100.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def posts_at(*seconds: float) -> list[Envelope]:
    return [
        Envelope(external_id=str(i), created_at=ORIGIN + timedelta(seconds=s), text="")
        for i, s in enumerate(seconds)
    ]


def paced(
    envelopes: list[Envelope], *, speed: float, batch_size: int = 250
) -> list[tuple[float, list[str]]]:
    """``(clock time after start, ids)`` for each batch as it is yielded."""
    fake = FakeClock()
    return [
        (round(fake.now - 100.0, 6), [e.external_id for e in batch])
        for batch in paced_batches(
            envelopes, speed=speed, batch_size=batch_size, clock=fake.clock, sleep=fake.sleep
        )
    ]


def test_pacing_divides_event_time_gaps_by_the_speed() -> None:
    batches = paced(posts_at(0, 60, 120), speed=60)

    assert batches == [(0.0, ["0"]), (1.0, ["1"]), (2.0, ["2"])]


def test_pacing_flushes_a_partial_batch_when_the_next_event_is_far_off() -> None:
    batches = paced(posts_at(0, 0.05, 0.1, 30, 30.1), speed=1)

    assert batches == [(0.1, ["0", "1", "2"]), (30.1, ["3", "4"])]


def test_pacing_holds_no_event_longer_than_the_flush_window_nor_sends_it_early() -> None:
    steady = posts_at(*[i * 0.1 for i in range(20)])  # post i is due at i * 0.1 s

    batches = paced(steady, speed=1)
    held = [sent_at - int(i) * 0.1 for sent_at, ids in batches for i in ids]

    assert [i for _, ids in batches for i in ids] == [str(i) for i in range(20)]
    assert len(batches) > 1
    assert min(held) >= -1e-9
    assert max(held) <= FLUSH_WINDOW_S + 1e-9


def test_pacing_still_cuts_full_batches() -> None:
    batches = paced(posts_at(0, 0, 0, 0, 0), speed=1, batch_size=2)

    assert [ids for _, ids in batches] == [["0", "1"], ["2", "3"], ["4"]]


def test_a_rate_paces_events_steadily_whatever_the_event_time_gaps() -> None:
    fake = FakeClock()
    archive = posts_at(0, 3600, 3600.5, 86400, 86401)  # hours and a day apart

    batches = [
        (round(fake.now - 100.0, 6), [e.external_id for e in batch])
        for batch in paced_batches(
            archive, speed=None, rate=4, batch_size=250, clock=fake.clock, sleep=fake.sleep
        )
    ]

    # Four events a second: event i is due at i / 4 s, in batches no wider than the
    # flush window.
    assert batches == [(0.0, ["0"]), (0.25, ["1"]), (0.5, ["2"]), (0.75, ["3"]), (1.0, ["4"])]


def test_without_a_speed_batches_come_at_once() -> None:
    fake = FakeClock()

    batches = list(
        paced_batches(
            posts_at(0, 3600, 7200), speed=None, batch_size=2, clock=fake.clock, sleep=fake.sleep
        )
    )

    assert [len(batch) for batch in batches] == [2, 1]
    assert fake.now == 100.0


def test_it_waits_for_missing_worker_pools_then_replays_anyway(
    captured: Captured, team: Team, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []

    def nobody_consumes(*args: object, **kwargs: object) -> set[str]:
        asked.append(1)
        return {"enrich", "detect"}

    monkeypatch.setattr(celery, "missing_consumers", nobody_consumes)
    err = io.StringIO()

    call_command(
        "replay",
        str(SAMPLES / "airline.csv"),
        "--wait-workers",
        "1.5",
        stdout=io.StringIO(),
        stderr=err,
    )

    assert len(asked) >= 2
    assert "waiting for worker pools: detect, enrich" in err.getvalue()
    assert "replaying anyway" in err.getvalue()
    assert captured.envelopes


# --- The progress bar --------------------------------------------------------------------


def test_on_a_terminal_the_bar_shows_the_event_time_reached_and_the_events_sent(
    team: Team, captured: Captured
) -> None:
    err = Terminal()

    out = replay_err(str(SAMPLES / "x_v2.jsonl"), stderr=err)

    assert "event time 2024-10-17 14:10:41 UTC" in err.getvalue()
    assert "5/5 events sent" in err.getvalue()
    assert "100% of event time" in err.getvalue()
    assert "event time" not in out


def test_off_a_terminal_the_bar_stays_quiet(team: Team, captured: Captured) -> None:
    err = io.StringIO()

    replay_err(str(SAMPLES / "x_v2.jsonl"), stderr=err)

    assert err.getvalue() == ""


# --- What the pipeline did (--wait) -----------------------------------------------------


def test_with_wait_it_reports_what_the_pipeline_stored(
    team: Team, synchronous_ingest: Captured
) -> None:
    out = replay(str(SAMPLES / "airline.csv"), "--wait", "5")
    last = out.splitlines()[-1]

    assert last.startswith("stored 3 new, 0 duplicates, 0 dead letters (ingest 0, replay 0);")
    assert "the pipeline drained in" in last
    assert Event.objects.count() == 3


def test_a_repeated_replay_reads_as_a_repeat(team: Team, synchronous_ingest: Captured) -> None:
    replay(str(SAMPLES / "airline.csv"), "--wait")

    out = replay(str(SAMPLES / "airline.csv"), "--wait")

    assert "stored 0 new, 3 duplicates, 0 dead letters (ingest 0, replay 0)" in out
    assert Event.objects.count() == 3


def test_with_wait_bad_rows_count_as_replay_dead_letters(
    team: Team, synchronous_ingest: Captured, tmp_path: Path
) -> None:
    out = replay(str(broken_airline_file(tmp_path)), "--wait", "5")

    assert "stored 3 new, 0 duplicates, 3 dead letters (ingest 0, replay 3)" in out


def test_with_wait_a_pipeline_that_does_not_drain_fails_with_what_is_left(
    team: Team, synchronous_ingest: Captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "is_idle", lambda: False)
    out = io.StringIO()

    with pytest.raises(CommandError, match=r"did not drain within 0.2 s: 0 batches"):
        call_command(
            "replay",
            str(SAMPLES / "airline.csv"),
            "--wait",
            "0.2",
            stdout=out,
            stderr=io.StringIO(),
        )

    assert "so far stored 3 new, 0 duplicates" in out.getvalue()


@pytest.mark.parametrize("seconds", ["0", "-1", "soon", "inf"])
def test_it_refuses_a_wait_that_is_not_a_positive_number(
    team: Team, captured: Captured, seconds: str
) -> None:
    with pytest.raises(CommandError, match="--wait"):
        replay(str(SAMPLES / "x_v1.jsonl"), "--wait", seconds)


def test_with_wait_rows_repeated_within_the_archive_are_named_as_such(
    team: Team, synchronous_ingest: Captured, tmp_path: Path
) -> None:
    path = tmp_path / "airline.csv"
    lines = (SAMPLES / "airline.csv").read_text().splitlines(keepends=True)
    path.write_text("".join(lines) + lines[1])

    first = replay(str(path), "--wait")
    second = replay(str(path), "--wait")

    assert "stored 3 new, 1 duplicates (1 repeated within the archive), 0 dead letters" in first
    assert "stored 0 new, 4 duplicates (1 repeated within the archive), 0 dead letters" in second


def test_duplicates_are_what_was_sent_and_neither_stored_nor_dead_lettered_at_ingest() -> None:
    outcome = Outcome.between(
        {"events": 10, "dead_letters": 1},
        {"events": 12, "dead_letters": 5},
        sent=6,
        replay_dead=3,
    )

    assert outcome == Outcome(stored=2, duplicates=3, ingest_dead_letters=1, replay_dead_letters=3)
    assert outcome.text() == "stored 2 new, 3 duplicates, 4 dead letters (ingest 1, replay 3)"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_through_real_workers_a_second_replay_stores_nothing_new(celery_worker: None) -> None:
    make_team("newsroom")
    args = (str(SAMPLES / "x_v2.jsonl"), "--wait", "120", "--wait-workers", "0")

    first = replay(*args)
    second = replay(*args)

    assert "stored 5 new, 0 duplicates, 0 dead letters (ingest 0, replay 0)" in first
    assert "stored 0 new, 5 duplicates, 0 dead letters (ingest 0, replay 0)" in second
    assert Event.objects.filter(enriched_at__isnull=False).count() == 5
    assert pipeline.is_idle()
