"""The pure parts of ``bench/aged_platform.py``, the old sources of ``make bench
BENCH_ARGS=--aged``: what it serves and replays, and how it compares the two modes. No
timing here: speed is measured in the benchmark itself."""

from __future__ import annotations

import calendar
import email.utils
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import feedparser
import pytest

from bench import aged_platform

FIRST = datetime(2012, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[aged_platform.FeedServer]:
    (tmp_path / "old.rss").write_bytes(b"<rss version='2.0'><channel></channel></rss>")
    server = aged_platform.FeedServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_the_old_feeds_hold_only_items_years_old(shared_data: Path) -> None:
    newest = []
    for name in aged_platform.OLD_FEEDS:
        parsed = feedparser.parse((shared_data / "rss_feeds" / name).read_bytes())
        newest.append(
            max(
                datetime.fromtimestamp(
                    calendar.timegm(e.get("published_parsed") or e["updated_parsed"]), UTC
                )
                for e in parsed.entries
            )
        )

    assert max(newest) < datetime.now(UTC) - timedelta(days=5 * 365)


def test_the_old_archives_exist_and_are_not_the_timed_one(shared_data: Path) -> None:
    paths = [shared_data / relative for relative in aged_platform.OLD_ARCHIVES]

    assert [p.is_file() for p in paths] == [True] * len(paths)
    assert "Tweets.csv" not in [p.name for p in paths]


def test_the_feed_server_serves_a_file_then_says_it_has_not_changed(
    served: aged_platform.FeedServer,
) -> None:
    with urllib.request.urlopen(served.url("old.rss"), timeout=5) as response:
        body, modified = response.read(), response.headers["Last-Modified"]
    again = urllib.request.Request(served.url("old.rss"), headers={"If-Modified-Since": modified})

    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(again, timeout=5)

    assert body.startswith(b"<rss")
    assert email.utils.parsedate_to_datetime(modified) is not None
    assert answer.value.code == 304


def test_a_source_none_of_whose_buckets_is_stepped_is_behind_from_its_first_event() -> None:
    watermark = FIRST + timedelta(days=365)

    behind = aged_platform.buckets_behind(None, watermark.timestamp(), FIRST.timestamp())

    assert behind == 365 * 24 * 12


def test_a_source_is_behind_by_the_buckets_after_its_last_stepped_one() -> None:
    last = FIRST + timedelta(days=1)

    behind = aged_platform.buckets_behind(
        last.timestamp(), (last + timedelta(minutes=61)).timestamp(), FIRST.timestamp()
    )

    assert behind == 11


def test_a_source_stepped_up_to_its_watermark_is_not_behind() -> None:
    behind = aged_platform.buckets_behind(
        FIRST.timestamp(), (FIRST + timedelta(minutes=9)).timestamp(), FIRST.timestamp()
    )

    assert behind == 0


def test_rates_within_ten_percent_pass() -> None:
    fresh = {"events_per_s": 2000.0, "alert_latency_p95_ms": 300.0}
    aged = {"events_per_s": 1850.0, "alert_latency_p95_ms": 360.0}

    comparison = aged_platform.compare(fresh, aged)

    assert comparison["events_per_s_ratio"] == 0.925
    assert comparison["alert_latency_p95_ratio"] == 1.2
    assert comparison["within_tolerance"] is True


def test_an_aged_rate_a_quarter_of_the_fresh_one_fails() -> None:
    comparison = aged_platform.compare({"events_per_s": 1794.0}, {"events_per_s": 472.0})

    assert comparison["events_per_s_ratio"] == 0.263
    assert comparison["within_tolerance"] is False


def test_a_missing_rate_gives_no_ratio_and_fails() -> None:
    comparison = aged_platform.compare({"events_per_s": None}, {"events_per_s": 1000.0})

    assert comparison["events_per_s_ratio"] is None
    assert comparison["alert_latency_p50_ratio"] is None
    assert comparison["within_tolerance"] is False


def test_the_cpu_model_and_its_avx512_flags_come_from_cpuinfo() -> None:
    cpuinfo = (
        "processor\t: 0\nmodel name\t: Example CPU @ 2.10GHz\n"
        "flags\t\t: fpu sse2 avx2 avx512f avx512bw\n\n"
        "processor\t: 1\nmodel name\t: Example CPU @ 2.10GHz\nflags\t\t: fpu\n"
    )

    assert aged_platform.cpu_description(cpuinfo) == {
        "model": "Example CPU @ 2.10GHz",
        "avx512": True,
        "avx512_flags": ["avx512bw", "avx512f"],
    }


def test_a_cpu_without_avx512_says_so() -> None:
    described = aged_platform.cpu_description("model name : Other\nflags : fpu avx2\n")

    assert described == {"model": "Other", "avx512": False, "avx512_flags": []}


def test_each_mode_gets_its_own_database_and_redis_db_on_the_same_servers() -> None:
    database = "postgres://bench:secret@db.example:5433/twiscope?sslmode=disable"

    assert (
        aged_platform.database_url_for(database, "twiscope_aged")
        == "postgres://bench:secret@db.example:5433/twiscope_aged?sslmode=disable"
    )
    assert aged_platform.redis_url_for("redis://cache.example:6390/0", 2) == (
        "redis://cache.example:6390/2"
    )
