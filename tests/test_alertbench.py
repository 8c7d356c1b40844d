"""``evaluate alerts``: events injected into a background, replayed as one stream.

The generated archives are written per test under ``tmp_path``; the real data sets are
read in place from ``../shared/data`` (the ``shared_data`` fixture).
"""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from ingest.envelope import Envelope
from ingest.sources.replay.formats import detect_format, read_archive
from ingest.sources.replay.rows import snowflake_time
from mlengine.evaluation import alertbench, background, crisislex

START = datetime(2015, 3, 1, tzinfo=UTC)
"""The generated background's first post."""
QUAKE_AT = datetime(2012, 9, 5, 14, 42, tzinfo=UTC)
"""The generated event's burst starts here (before it is shifted)."""
WORDS = (
    *("coffee", "morning", "traffic", "weather", "lunch", "music", "movie", "garden"),
    *("dinner", "office", "meeting", "weekend", "football", "concert", "recipe", "travel"),
    *("holiday", "shopping", "market", "bakery"),
)


@pytest.fixture(autouse=True)
def production_history(settings: Any) -> None:
    """Production's figures: no history required (``TRENDS_MIN_HISTORY_BUCKETS`` is 0
    in twiscope/settings.py; the test settings pin 3 for the other tests)."""
    settings.TRENDS_MIN_HISTORY_BUCKETS = 0


def write_background(path: Path) -> Path:
    """48 h of everyday chatter (a post every 3 minutes, words in rotation, 40 authors)
    in the airline CSV's columns, with two bursts of 25 posts in 12 minutes by 25
    authors: "chile wine" (a keyword word of the event) at 3 h and "parade" at 10 h."""
    rows = []
    for n in range(960):
        text = " ".join(WORDS[(n * k + k) % len(WORDS)] for k in (1, 3, 7))
        rows.append((START + timedelta(minutes=3 * n), f"user{n % 40}", text))
    for hours, text in ((3, "chile wine tasting tonight"), (10, "the big parade downtown")):
        for n in range(25):
            rows.append((START + timedelta(hours=hours, seconds=30 * n), f"fan{n}", text))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tweet_id", "tweet_created", "name", "text"])
        for n, (at, name, text) in enumerate(rows):
            stamp = at.strftime("%Y-%m-%d %H:%M:%S +0000")
            writer.writerow([str(background.snowflake_id(at, n)), stamp, name, text])
    return path


def write_event(root: Path, name: str = "2012_quake") -> Path:
    """A CrisisLexT26-layout folder: two posts days before, a burst of 30 posts in 15
    minutes, ten more over 5 hours; keywords "Chile earthquake"."""
    folder = root / name
    folder.mkdir(parents=True)
    posts = [(QUAKE_AT - timedelta(days=d), "earthquake drill at school") for d in (3, 2)]
    posts += [
        (QUAKE_AT + timedelta(seconds=30 * n), "Strong earthquake hits Chile") for n in range(30)
    ]
    posts += [(QUAKE_AT + timedelta(minutes=30 * n), "aftershocks continue") for n in range(1, 11)]
    ids = [str(background.snowflake_id(at, n)) for n, (at, _) in enumerate(posts)]
    with (folder / f"{name}-tweets_labeled.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Tweet ID", " Tweet Text", " Information Source", " Information Type"])
        writer.writerows(
            [i, text, "media", "other"] for i, (_, text) in zip(ids, posts, strict=True)
        )
    with (folder / f"{name}-tweetids_entire_period.csv").open("w", encoding="utf-8") as fh:
        fh.write("Timestamp, Tweet-ID, Included(Y/N)\n")
        fh.writelines(
            f'"{at:%a %b %d %H:%M:%S +0000 %Y}","{i}",Y\n'
            for i, (at, _) in zip(ids, posts, strict=True)
        )
    description = {"name": "Chile quake", "keywords": ["Chile earthquake", "#chilequake"]}
    (folder / f"{name}-event_description.json").write_text(json.dumps(description))
    return folder


def run(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "alerts.json"
    call_command("evaluate", "alerts", *args, "--json", str(out))
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_an_injected_burst_is_detected_and_background_bursts_are_false_alerts(
    tmp_path: Path,
) -> None:
    bg = write_background(tmp_path / "background.csv")
    write_event(tmp_path / "events")

    result = run(
        tmp_path, "--background", str(bg), "--events", str(tmp_path / "events"), "--share", "5"
    )

    (event,) = result["events"]
    # One event: the background's span (47.95 h) in two slots; the event's burst (its
    # 5th post within an hour, 2 minutes into the burst) a quarter into the second.
    burst = datetime.fromisoformat(event["burst"])
    slot = timedelta(hours=47.95) / 2
    assert abs(burst - (START + slot * 1.25)) < timedelta(seconds=1)
    assert event["span"] == [(START + slot).isoformat(), (START + 2 * slot).isoformat()]
    assert (event["sample"], event["kept"], event["posts_injected"]) == (42, 1.0, 40)
    assert event["detected"] is True
    first = min(datetime.fromisoformat(a["named_at"]) for a in event["fired"] if a["named_at"])
    assert event["delay_from_burst_h"] == round((first - burst).total_seconds() / 3600, 2)
    assert 0 <= event["delay_from_burst_h"] <= 0.25
    assert event["keyword_precision"] == 1.0
    assert event["alerts"] == len(event["fired"]) >= 1
    # The background's bursts are false alerts, "chile" too: its trend was the
    # background's posts, not the event's.
    assert result["background_days"] == round(47.95 / 24, 2)
    false = result["false_alerts"]
    assert {"parade", "chile"} <= {term for alert in false for term in alert["terms"]}
    assert {alert["origin"] for alert in false} == {"background"}
    assert result["false_alerts_per_day"] == round(len(false) / (47.95 / 24), 2)
    assert (result["detected"], result["detected_within_1h"], result["bucket_s"]) == (1, 1, 3600)


def test_the_json_holds_the_documented_fields(tmp_path: Path) -> None:
    bg = write_background(tmp_path / "background.csv")
    write_event(tmp_path / "events", "2012_quake")
    write_event(tmp_path / "events", "2013_quake")

    result = run(tmp_path, "--background", str(bg), "--events", str(tmp_path / "events"))

    assert {"events", "false_alerts_per_day", "background_days", "false_alerts"} <= set(result)
    assert [e["name"] for e in result["events"]] == ["2012_quake", "2013_quake"]
    for event in result["events"]:
        assert {"name", "detected", "delay_from_burst_h", "keyword_precision", "alerts"} <= set(
            event
        )
    for alert in result["false_alerts"]:
        assert set(alert) == {"at", "terms", "origin"}
    # At the default share, half the background's 21.06 posts an hour (1,010 in 47.95 h),
    # the busiest hour (the burst's 30 posts and 2 aftershocks) is thinned to 10.53:
    # ceil(42 * 10.53 / 32) = 14 posts of 42 kept, the same ones each run.
    assert [e["kept"] for e in result["events"]] == [0.333, 0.333]
    assert result["share"] == alertbench.DEFAULT_SHARE


def post(n: int, at: datetime, terms: tuple[str, ...] = ()) -> crisislex.Post:
    return crisislex.Post(n, str(n), at, f"?{n}", terms, " ".join(terms))


def test_events_are_placed_in_slots_of_their_own_and_thinned_deterministically() -> None:
    chatter = [post(n, START + timedelta(minutes=6 * n)) for n in range(481)]  # 48 h
    dense = crisislex.CrisisEvent(
        name="dense",
        posts=tuple(post(n, QUAKE_AT + timedelta(seconds=20 * n)) for n in range(60)),
        keywords=("x",),
        keyword_words=frozenset({"x"}),
    )
    sparse = crisislex.CrisisEvent(
        name="sparse",
        posts=tuple(post(n, QUAKE_AT + timedelta(hours=3 * n)) for n in range(20)),
        keywords=("y",),
        keyword_words=frozenset({"y"}),
    )

    placed = alertbench.inject(chatter, [dense, sparse], share=1.0)

    slot = timedelta(hours=16)
    assert [(p.start, p.end) for p in placed] == [
        (START + slot, START + 2 * slot),
        (START + 2 * slot, START + 3 * slot),
    ]
    # dense: 60 posts in its busiest hour, capped at 481 / 48 = 10.02 posts an hour:
    # ceil(10.02) = 11 kept, the burst (the 5th of them) 4 h into the slot; sparse never
    # bursts: kept whole, its busiest hour (its first post) 4 h in, and only the posts
    # inside the slot (4 h, 7 h, 10 h, 13 h).
    assert (placed[0].kept, len(placed[0].posts)) == (0.183, 11)
    assert placed[0].burst == START + slot + slot / 4
    assert placed[0].posts == alertbench.inject(chatter, [dense, sparse], share=1.0)[0].posts
    assert (placed[1].kept, placed[1].burst, len(placed[1].posts)) == (1.0, None, 4)
    assert placed[1].posts[0].created_at == START + 2 * slot + slot / 4
    assert all(p.start <= q.created_at < p.end for p in placed for q in p.posts)


def test_too_many_events_for_the_background_are_refused() -> None:
    chatter = [post(n, START + timedelta(minutes=n)) for n in range(120)]
    event = crisislex.CrisisEvent("e", (post(0, QUAKE_AT),), ("x",), frozenset({"x"}))

    with pytest.raises(alertbench.AlertBenchError, match="too short for 2 events"):
        alertbench.inject(chatter, [event, event])


def test_a_trend_is_driven_by_the_event_holding_most_of_its_posts() -> None:
    at = [START + timedelta(minutes=m) for m in range(6)]
    stream = alertbench.Stream(
        posts=tuple(post(n, t, ("chile",)) for n, t in enumerate(at)),
        origin=(-1, 0, 0, -1, 0, 0),
        times=tuple(at),
    )

    assert stream.driver("chile", at[0], at[5]) == 0  # 4 of 6
    assert stream.driver("chile", at[0], at[3]) == -1  # 2 of 4: not more than half
    assert stream.driver("other", at[0], at[5]) == -1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "needs --background PATH"),
        (("--background", "BG"), "and --events DIR"),
        (("--background", "missing.csv", "--events", "EVENTS"), "missing.csv"),
        (("--background", "BG", "--events", "nowhere"), "not a folder"),
        (("--background", "BG", "--events", "BG_DIR"), "no <event>/<event>-tweets_labeled"),
        (("--background", "BG", "--events", "EVENTS", "--share", "0"), "must be positive"),
    ],
)
def test_bad_input_is_a_command_error(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    paths = {
        "BG": str(write_background(tmp_path / "background.csv")),
        "BG_DIR": str(tmp_path),
        "EVENTS": str(write_event(tmp_path / "events").parent),
    }

    with pytest.raises(CommandError, match=message):
        call_command("evaluate", "alerts", *(paths.get(a, a) for a in args))


def test_a_background_that_is_no_archive_is_a_command_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("just some notes\n")
    write_event(tmp_path / "events")

    with pytest.raises(CommandError, match="not a known archive"):
        call_command(
            "evaluate",
            "alerts",
            "--background",
            str(tmp_path / "notes.txt"),
            "--events",
            str(tmp_path / "events"),
        )


def write_tweeteval(root: Path) -> Path:
    for task, lines in (("sentiment", 1500), ("emotion", 300)):
        (root / task).mkdir(parents=True)
        texts = "".join(f"{task} text number {n}\n" for n in range(lines))
        (root / task / "val_text.txt").write_text(texts + "\n")
        (root / task / "val_labels.txt").write_text("0\n" * lines)
    return root


def test_tweeteval_becomes_a_replayable_archive_at_the_stated_rate(tmp_path: Path) -> None:
    root = write_tweeteval(tmp_path / "tweeteval")
    out = tmp_path / "bg" / "tweeteval.jsonl"

    call_command(
        "evaluate", "background", "--tweeteval", str(root), "--out", str(out), "--seed", "3"
    )

    assert detect_format(out) == "x_v2_jsonl"
    posts = [e for e in read_archive(out) if isinstance(e, Envelope)]
    assert len(posts) == 1800
    assert sorted(p.text for p in posts) == sorted(
        [f"sentiment text number {n}" for n in range(1500)]
        + [f"emotion text number {n}" for n in range(300)]
    )
    times = [p.created_at for p in posts]
    assert times == sorted(times)
    assert times[0] >= datetime(2015, 2, 17, tzinfo=UTC)
    # 1,800 posts at 1,800 a day: about a day; busier around 20:00 UTC than 08:00.
    assert timedelta(hours=20) < times[-1] - times[0] < timedelta(hours=28)
    evening = sum(17 <= t.hour < 23 for t in times)
    morning = sum(5 <= t.hour < 11 for t in times)
    assert evening > 3 * morning
    assert len({p.author.key(p.external_id) for p in posts}) == 1800
    # The ids are snowflakes of the times.
    assert all(snowflake_time(int(p.external_id)) == p.created_at for p in posts)


def test_the_same_seed_writes_the_same_archive(tmp_path: Path) -> None:
    root = write_tweeteval(tmp_path / "tweeteval")
    start = background.parse_start("2020-01-01")
    for name in ("a", "b"):
        background.write_tweeteval(root, tmp_path / name, per_day=500, seed=1, start=start)
    background.write_tweeteval(root, tmp_path / "c", per_day=500, seed=2, start=start)

    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert (tmp_path / "a").read_bytes() != (tmp_path / "c").read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), r"no \*_text\.txt"),
        (("--per-day", "0"), "--per-day must be positive"),
        (("--start", "yesterday"), "not an ISO 8601"),
    ],
)
def test_the_background_command_refuses_bad_input(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    root = tmp_path / "tweeteval"
    root.mkdir()
    if args:
        write_tweeteval(tmp_path / "texts")
        root = tmp_path / "texts"

    with pytest.raises(CommandError, match=message):
        call_command(
            "evaluate", "background", "--tweeteval", str(root), "--out", str(tmp_path / "x"), *args
        )


REAL_EVENTS = ("2012_Costa_Rica_earthquake", "2013_LA_airport_shootings", "2013_NY_train_crash")


def test_the_command_on_the_airline_archive_with_real_events(
    shared_data: Path, tmp_path: Path
) -> None:
    events = tmp_path / "events"
    events.mkdir()
    for name in REAL_EVENTS:
        (events / name).symlink_to(shared_data / "crisislex_t26" / name)

    result = run(
        tmp_path,
        "--background",
        str(shared_data / "airline_tweets" / "Tweets.csv"),
        "--events",
        str(events),
    )

    # 14,485 distinct tweets over 7.5 days: 15-minute buckets, four slots of 45 h.
    assert result["background"]["posts"] == 14485
    assert (result["background_days"], result["bucket_s"]) == (7.51, 900)
    assert [e["name"] for e in result["events"]] == list(REAL_EVENTS)
    for event in result["events"]:
        span = [datetime.fromisoformat(t) for t in event["span"]]
        assert span[1] <= datetime.fromisoformat(result["background"]["end"])
        assert event["posts_injected"] > 0
        assert event["detected"] == (event["delay_from_burst_h"] is not None)
        assert event["alerts"] == len(event["fired"])
    start, end = (datetime.fromisoformat(result["background"][k]) for k in ("start", "end"))
    days = (end - start).total_seconds() / 86400
    assert result["false_alerts_per_day"] == round(len(result["false_alerts"]) / days, 2)
    # NY's burst, the clearest of the three, is found.
    assert result["events"][2]["detected"] is True


def test_tweeteval_made_a_background_with_real_events(shared_data: Path, tmp_path: Path) -> None:
    events = tmp_path / "events"
    events.mkdir()
    (events / REAL_EVENTS[2]).symlink_to(shared_data / "crisislex_t26" / REAL_EVENTS[2])
    archive = tmp_path / "tweeteval.jsonl"
    call_command(
        "evaluate",
        "background",
        "--tweeteval",
        str(shared_data / "tweeteval"),
        "--out",
        str(archive),
    )

    result = run(tmp_path, "--background", str(archive), "--events", str(events))

    # 40,256 texts at 1,800 a day: 22.65 days, 15-minute buckets.
    assert result["background"]["posts"] == 40256
    assert (result["background_days"], result["bucket_s"]) == (22.65, 900)
    (event,) = result["events"]
    assert event["name"] == REAL_EVENTS[2]
    assert event["detected"] is True
    assert result["false_alerts_per_day"] is not None and result["false_alerts_per_day"] < 2
