"""Cost of the anomaly stage with many sources: catch-up, and the steady 30-second beat.

Usage (needs DATABASE_URL and REDIS_URL of a scratch database: it creates a team, sources,
events and trends there, and deletes them at the end)::

    python bench/anomaly_stage.py [--sources 1,10,50] [--rate 20] [--hours 37] [--terms 20]
                                  [--beats 5] [--runs 3] [--json OUT] [--plot OUT.png]
    python bench/anomaly_stage.py --sparse [--sparse-years 5] [--sparse-events 300]
                                  [--baseline-days 30] [--runs 3] [--json OUT] [--plot OUT.png]

Creates max(``--sources``) sources, each with ``--hours`` of event time at about ``--rate``
events per 5-minute bucket (Poisson, with a daily swing of +/-40%), plus ``--beats``
buckets more: enriched events (``enriched_at`` set; sentiment labels, a quarter negative;
hashtags and keywords), and trends of ``--terms`` terms per source (each term first trends
at hour ``k / 2`` and again every 8 hours, so it stays watched: the stage's term series
are those of the source's trends of the last 24 h, at most ``ANOMALY_MAX_TERMS``). Events
are written with one ``COPY`` per source, not through ``ingest.services``: the stage reads
only the stored columns (event time, processing time, label, term arrays), and the persist
and enrich stages would take minutes for the 50-source stream on 2 cores.

Then, for each N in ``--sources`` and each of ``--runs`` repetitions (the stage's state,
i.e. every ``Series``, ``SeriesPoint`` and ``Anomaly`` of the bench sources, is deleted
first; the source's cursor is its volume series' ``last_bucket``, so that resets it too):

- catch-up: the first N sources' stream clocks are set to ``--hours`` after the origin
  (the others' to none, which the stage skips) and ``advance_anomalies`` is called until
  it reports no bucket left (it steps at most ``ANOMALY_MAX_BUCKETS`` per source a call);
- steady state: the stage's tables are analysed (untimed), then ``--beats`` times every
  clock moves one bucket and one call is timed: what the 30-second beat does all day
  (one new complete bucket per source every 5 minutes). ``--profile`` adds one more beat
  of the largest N under cProfile and reports its top functions.

``--sparse`` measures instead one source whose ``--sparse-events`` events (enriched, no
terms) lie at random over ``--sparse-years`` of event time, as an RSS feed with items
back years or a replayed archive: per repetition (state deleted first), the catch-up of
its first ``--baseline-days`` stepping every bucket (``advance_anomalies(jump=False)``)
and jumping (``jump=True``; the two must leave the same points, anomalies and states:
``identical``), and the catch-up of the whole span jumping. Stepping the whole span
would take minutes per repetition, so its time is extrapolated from the baseline's
seconds per bucket (stepping costs the same for every bucket: said so in the output).

Per call: wall and CPU seconds of this process (the rest is waiting on PostgreSQL),
buckets stepped, series-buckets (``SeriesPoint`` rows written), microseconds per
series-bucket, and round trips: the queries Django saw (``CaptureQueriesContext``) plus
the statements of the stage's ``execute_values`` and ``COPY`` calls (which go to psycopg2
directly and so escape the capture). Figures are medians over the repetitions (the steady beat: of
each repetition's median beat); ratios are against the smallest N of the same run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twiscope.settings")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.db import connection, reset_queries  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402
from django.utils import timezone  # noqa: E402
from psycopg2.extras import execute_values  # noqa: E402

from ingest.models import Source  # noqa: E402
from mlengine.anomalies import persistence  # noqa: E402
from mlengine.anomalies import stage as anomaly_stage  # noqa: E402
from mlengine.anomalies.persistence import copy_points  # noqa: E402
from mlengine.anomalies.series import BUCKET_S  # noqa: E402
from mlengine.models import Anomaly, Series, StreamClock, Trend  # noqa: E402
from teams.models import Team  # noqa: E402

ORIGIN = datetime(2024, 3, 4, 0, 0, tzinfo=UTC)
BUCKET = timedelta(seconds=BUCKET_S)
SLUG = "bench-anomaly-"
BACKGROUND_TAGS = 400
BACKGROUND_WORDS = 300
COLUMNS = (
    "source_id, external_id, created_at, received_at, author_id, author_handle, author_name, "
    "text, lang, url, reply_to, repost_of, quote_of, metrics, raw, hashtags, mentions, "
    "cashtags, urls, keywords, sentiment, enriched_at, sentiment_label, sentiment_model"
)
LABELS = ("negative", "neutral", "positive")
SENTIMENT = {"negative": "-0.6", "neutral": "0", "positive": "0.6"}


def trending_terms(terms: int) -> list[str]:
    """The terms that trend on every source: hashtags and keywords, alternately."""
    return [f"#topic{k}" if k % 2 == 0 else f"story{k}" for k in range(terms)]


def stream_rows(
    source_id: int, buckets: int, rate: float, terms: list[str], rng: np.random.Generator
) -> tuple[str, int]:
    """One source's events as COPY text rows, and how many."""
    phase = rng.uniform(0, 2 * np.pi)
    b = np.arange(buckets)
    lam = rate * (1 + 0.4 * np.sin(2 * np.pi * b / 288 + phase))
    counts = rng.poisson(lam)
    n = int(counts.sum())
    bucket_of = np.repeat(b, counts)
    epoch = ORIGIN.timestamp() + bucket_of * BUCKET_S + rng.uniform(0, 300, n)
    labels = rng.choice(3, n, p=[0.25, 0.45, 0.30])
    zipf = 1.0 / np.arange(1, len(terms) + 1)
    trend_pick = rng.choice(len(terms), n, p=zipf / zipf.sum()) if terms else np.zeros(n, int)
    has_trend = rng.random(n) < (0.6 if terms else 0.0)
    tag = rng.integers(0, BACKGROUND_TAGS, n)
    has_tag = rng.random(n) < 0.4
    words = rng.integers(0, BACKGROUND_WORDS, (n, 2))
    authors = rng.integers(0, 3000, n)
    lines = []
    for i in range(n):
        created = datetime.fromtimestamp(float(epoch[i]), UTC)
        received = (created + timedelta(seconds=2)).isoformat()
        hashtags = [f"#tag{tag[i]}"] if has_tag[i] else []
        keywords = [f"word{words[i, 0]}", f"word{words[i, 1]}"]
        if has_trend[i]:
            term = terms[trend_pick[i]]
            (hashtags if term.startswith("#") else keywords).append(term)
        label = LABELS[labels[i]]
        lines.append(
            f"{source_id}\t{bucket_of[i]}-{i}\t{created.isoformat()}\t{received}\t"
            f"a{authors[i]}\tuser{authors[i]}\tUser {authors[i]}\tpost {i}\ten\t\t\t\t\t"
            f"{{}}\t{{}}\t{{{','.join(hashtags)}}}\t{{}}\t{{}}\t{{}}\t{{{','.join(keywords)}}}\t"
            f"{SENTIMENT[label]}\t{received}\t{label}\tvader\n"
        )
    return "".join(lines), n


def make_trends(source: Source, terms: list[str], hours: float, now: datetime) -> list[Trend]:
    """Trends of each term: first at hour k / 2, then every 8 hours, to ``hours``."""
    trends = []
    for k, term in enumerate(terms):
        at = ORIGIN + timedelta(minutes=30 * k)
        while at < ORIGIN + timedelta(hours=hours):
            trends.append(
                Trend(
                    source=source,
                    term=term,
                    bucket_start=at,
                    bucket_s=900,
                    events=12,
                    expected=2.0,
                    score=6.0,
                    authors_count=12,
                    velocity=0.5,
                    detected_at=now,
                    updated_at=now,
                    evidence_received_at=now,
                    evidence_created_at=at + timedelta(minutes=7),
                )
            )
            at += timedelta(hours=8)
    return trends


def remove_bench_data() -> None:
    """Delete every team (and its sources' rows) an earlier run of this bench left."""
    ids = list(Source.objects.filter(team__slug__startswith=SLUG).values_list("id", flat=True))
    if ids:
        reset_state(ids, vacuum=False)
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM ingest_event WHERE source_id = ANY(%s)", [ids])
    Team.objects.filter(slug__startswith=SLUG).delete()


def setup(count: int, options: argparse.Namespace) -> tuple[list[int], dict[str, Any]]:
    """Create ``count`` sources with their streams and trends; return ids and a summary."""
    run = uuid.uuid4().hex[:8]
    team = Team.objects.create(name=f"bench anomaly {run}", slug=f"{SLUG}{run}")
    terms = trending_terms(options.terms)
    # One bucket more than the beats: the profiled beat's.
    buckets = int(options.hours * 3600) // BUCKET_S + options.beats + 1
    rng = np.random.default_rng(options.seed)
    now = timezone.now()
    ids: list[int] = []
    events = 0
    started = time.perf_counter()
    for s in range(count):
        source = Source.objects.create(team=team, kind="replay", name=f"anomaly-{run}-{s}")
        StreamClock.objects.create(source=source, watermark=None, bucket_s=900)
        text, n = stream_rows(source.id, buckets, options.rate, terms, rng)
        with connection.cursor() as cursor:
            cursor.cursor.copy_expert(
                f"COPY ingest_event ({COLUMNS}) FROM STDIN", io.StringIO(text)
            )
        until = options.hours + (options.beats + 1) / 12
        Trend.objects.bulk_create(make_trends(source, terms, until, now))
        ids.append(source.id)
        events += n
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE ingest_event")
        cursor.execute("ANALYZE mlengine_trend")
    return ids, {
        "events": events,
        "events_per_source": round(events / count, 1),
        "trends": Trend.objects.filter(source_id__in=ids).count(),
        "insert_s": round(time.perf_counter() - started, 1),
        "insert_method": "COPY per source (Trend rows: bulk_create)",
    }


def reset_state(source_ids: list[int], *, vacuum: bool = True) -> None:
    """Forget everything the stage wrote for ``source_ids`` (its cursor included)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "DELETE FROM mlengine_seriespoint p USING mlengine_series s "
            "WHERE p.series_id = s.id AND s.source_id = ANY(%s)",
            [source_ids],
        )
    Anomaly.objects.filter(source_id__in=source_ids).delete()
    Series.objects.filter(source_id__in=source_ids).delete()
    if vacuum:
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE mlengine_seriespoint, mlengine_series, mlengine_anomaly")


def points_of(source_ids: list[int]) -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM mlengine_seriespoint p JOIN mlengine_series s "
            "ON p.series_id = s.id WHERE s.source_id = ANY(%s)",
            [source_ids],
        )
        return int(cursor.fetchone()[0])


class BulkStatements:
    """``execute_values`` that counts the statements it sends (one per page); ``copy``
    wraps ``persistence.copy_points`` to count its ``COPY`` (its other two statements go
    through Django's cursor and are captured)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, cur: Any, sql: str, argslist: Any, **kwargs: Any) -> Any:
        rows = list(argslist)
        self.count += math.ceil(len(rows) / kwargs.get("page_size", 100))
        return execute_values(cur, sql, rows, **kwargs)

    def copy(self, cursor: Any, points: list[tuple[Any, ...]]) -> None:
        self.count += 1
        copy_points(cursor, points)


def timed_call(active: list[int], bulk: BulkStatements, *, jump: bool = True) -> dict[str, Any]:
    """One ``advance_anomalies`` call, timed, with its round trips and points written."""
    before = points_of(active)
    bulk.count = 0
    reset_queries()  # the log keeps 9,000 queries: a full one would count none
    with CaptureQueriesContext(connection) as queries:
        cpu, wall = time.process_time(), time.perf_counter()
        result = anomaly_stage.advance_anomalies(jump=jump)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    series_buckets = points_of(active) - before
    by_statement: dict[str, float] = {}
    for query in queries.captured_queries:
        key = " ".join(query["sql"].split())[:70]
        by_statement[key] = by_statement.get(key, 0.0) + float(query["time"])
    slowest = sorted(by_statement.items(), key=lambda kv: -kv[1])[:4]
    return {
        "wall_s": round(wall, 4),
        "cpu_s": round(cpu, 4),
        "buckets": result.buckets,
        "series_buckets": series_buckets,
        "us_per_series_bucket": round(wall * 1e6 / max(series_buckets, 1), 2),
        "queries": len(queries) + bulk.count,
        "django_queries": len(queries),
        "bulk_statements": bulk.count,
        "django_query_s": round(sum(by_statement.values()), 4),
        "slowest_statements": [[sql, round(t, 4)] for sql, t in slowest],
        "anomalies": len(result.anomaly_ids),
        "more": result.more,
        "steps": result.steps,
        "jumps": result.jumps,
    }


def set_clocks(source_ids: list[int], active: list[int], watermark: datetime) -> None:
    StreamClock.objects.filter(source_id__in=source_ids).update(watermark=None)
    StreamClock.objects.filter(source_id__in=active).update(watermark=watermark)


def one_repetition(
    source_ids: list[int],
    n: int,
    options: argparse.Namespace,
    bulk: BulkStatements,
    *,
    profile: bool = False,
) -> dict[str, Any]:
    active = source_ids[:n]
    reset_state(source_ids)
    watermark = ORIGIN + timedelta(hours=options.hours)
    set_clocks(source_ids, active, watermark)
    catch_up = [timed_call(active, bulk)]
    while catch_up[-1]["more"]:
        catch_up.append(timed_call(active, bulk))
    # Statistics as autovacuum keeps them in production: those of the emptied tables
    # (the reset's VACUUM ANALYZE) make the per-source retention DELETE a sequential
    # scan of every source's points.
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE mlengine_seriespoint, mlengine_series, mlengine_anomaly")
    beats = []
    for _ in range(options.beats):
        watermark += BUCKET
        StreamClock.objects.filter(source_id__in=active).update(watermark=watermark)
        beat = timed_call(active, bulk)
        if beat["buckets"] != n or beat["more"]:
            raise RuntimeError(f"a steady beat stepped {beat['buckets']} buckets, not {n}")
        beats.append(beat)
    profiled = []
    if profile:
        watermark += BUCKET
        StreamClock.objects.filter(source_id__in=active).update(watermark=watermark)
        profiled = profile_beat()
    series = Series.objects.filter(source_id__in=active, active=True)
    state_bytes = [len(s) for s in series.values_list("state", flat=True) if s is not None]
    catch_wall = sum(c["wall_s"] for c in catch_up)
    catch_sb = sum(c["series_buckets"] for c in catch_up)
    return {
        "series": series.count(),
        "state_bytes_per_series": round(statistics.mean(state_bytes)) if state_bytes else 0,
        "catch_up": {
            "calls": catch_up,
            "wall_s": round(catch_wall, 3),
            "cpu_s": round(sum(c["cpu_s"] for c in catch_up), 3),
            "buckets": sum(c["buckets"] for c in catch_up),
            "series_buckets": catch_sb,
            "us_per_series_bucket": round(catch_wall * 1e6 / max(catch_sb, 1), 2),
            "max_call_wall_s": max(c["wall_s"] for c in catch_up),
        },
        "steady": {
            "beats": beats,
            "wall_s": statistics.median(b["wall_s"] for b in beats),
            "cpu_s": statistics.median(b["cpu_s"] for b in beats),
            "us_per_series_bucket": statistics.median(b["us_per_series_bucket"] for b in beats),
            "queries": statistics.median(b["queries"] for b in beats),
        },
        "profiled_beat": profiled,
    }


def summarise(n: int, reps: list[dict[str, Any]]) -> dict[str, Any]:
    def med(pick: Callable[[dict[str, Any]], float]) -> float:
        return round(statistics.median(pick(r) for r in reps), 4)

    return {
        "sources": n,
        "series": reps[0]["series"],
        "state_bytes_per_series": reps[0]["state_bytes_per_series"],
        "catch_up": {
            "calls": len(reps[0]["catch_up"]["calls"]),
            "buckets": reps[0]["catch_up"]["buckets"],
            "series_buckets": reps[0]["catch_up"]["series_buckets"],
            "wall_s": med(lambda r: r["catch_up"]["wall_s"]),
            "cpu_s": med(lambda r: r["catch_up"]["cpu_s"]),
            "max_call_wall_s": med(lambda r: r["catch_up"]["max_call_wall_s"]),
            "us_per_series_bucket": med(lambda r: r["catch_up"]["us_per_series_bucket"]),
            "queries_per_call": [c["queries"] for c in reps[0]["catch_up"]["calls"]],
        },
        "steady": {
            "wall_s": med(lambda r: r["steady"]["wall_s"]),
            "cpu_s": med(lambda r: r["steady"]["cpu_s"]),
            "us_per_series_bucket": med(lambda r: r["steady"]["us_per_series_bucket"]),
            "queries": med(lambda r: r["steady"]["queries"]),
        },
        "repetitions": reps,
    }


def capacity(results: list[dict[str, Any]]) -> dict[str, Any]:
    """A curve through the steady beats (seconds against N: a parabola through three or
    more sizes, a line through two), and the N at which a beat would take 30 s (the beat
    interval), 90 s (the task's soft time limit) and 300 s (a bucket's length: one worker
    doing nothing else). An extrapolation past the largest N measured."""
    xs = [float(r["sources"]) for r in results]
    ys = [r["steady"]["wall_s"] for r in results]
    if len(xs) < 2:
        return {}
    coeffs = np.polyfit(xs, ys, min(2, len(xs) - 1))
    if len(coeffs) == 3 and coeffs[0] <= 0:
        coeffs = np.polyfit(xs, ys, 1)

    def within(budget: float) -> int | None:
        roots = np.roots(np.polysub(coeffs, [budget]))
        real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real > 0]
        return int(min(real)) if real else None

    return {
        "fit_seconds_by_power_of_n": [float(f"{c:.4g}") for c in coeffs],
        "sources_within_30_s": within(30.0),
        "sources_within_90_s": within(90.0),
        "sources_within_300_s": within(300.0),
    }


def profile_beat(top: int = 25) -> list[dict[str, Any]]:
    """One ``advance_anomalies`` call under cProfile: its ``top`` functions by cumulative
    time (name, calls, cumulative and own seconds)."""
    profiler = cProfile.Profile()
    profiler.enable()
    anomaly_stage.advance_anomalies()
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "site-packages/" in file:
            where = file.split("site-packages/")[-1]
        elif file.startswith(str(ROOT)):
            where = str(Path(file).relative_to(ROOT))
        elif file.startswith("~"):
            where = file
        else:
            where = f"stdlib/{Path(file).name}"
        rows.append(
            {
                "function": f"{where}:{line}({name})",
                "calls": calls,
                "cumulative_s": round(cumulative, 4),
                "own_s": round(own, 4),
            }
        )
    return sorted(rows, key=lambda r: -r["cumulative_s"])[:top]


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    n = [r["sources"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    axes[0].plot(n, [r["steady"]["wall_s"] * 1000 for r in rows], "o-", label="steady beat")
    axes[0].plot(
        n,
        [r["catch_up"]["max_call_wall_s"] * 1000 for r in rows],
        "s--",
        label="largest catch-up call",
    )
    axes[0].set(title="Wall ms per call", xlabel="sources", ylabel="ms", yscale="log")
    axes[0].legend(fontsize=8)
    axes[1].plot(n, [r["steady"]["us_per_series_bucket"] for r in rows], "o-", label="steady")
    axes[1].plot(n, [r["catch_up"]["us_per_series_bucket"] for r in rows], "s--", label="catch-up")
    axes[1].set(title="µs per series-bucket", xlabel="sources", ylabel="µs")
    axes[1].legend(fontsize=8)
    axes[2].plot(n, [r["steady"]["queries"] for r in rows], "o-", label="steady beat")
    axes[2].set(title="Round trips per call", xlabel="sources", ylabel="queries")
    axes[2].legend(fontsize=8)
    config = result["config"]
    fig.suptitle(
        f"advance_anomalies: {config['rate']} events/bucket, {config['terms']} terms/source, "
        f"{config['hours']} h history; medians of {config['runs']} runs"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def revision() -> str:
    """HEAD, and the files of the code measured that differ from it."""
    measured = ["mlengine/anomalies", "ingest/selectors.py"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", *measured],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.split()
    except OSError:
        return "unknown"
    changed = [path for path in dirty if path in measured]
    return f"{head} + uncommitted {', '.join(changed)}" if changed else head


def print_table(result: dict[str, Any]) -> None:
    print(
        "\n| N | series | catch-up calls | catch-up s | largest call s | µs/series-bucket | "
        "queries/call | steady beat ms | CPU ms | µs/series-bucket | queries/beat | "
        "beat ×N=1 | queries ×N=1 |"
    )
    print("|---" * 13 + "|")
    for r in result["results"]:
        c, s, ratio = r["catch_up"], r["steady"], r["ratio_to_smallest"]
        print(
            f"| {r['sources']} | {r['series']} | {c['calls']} | {c['wall_s']:.2f} | "
            f"{c['max_call_wall_s']:.2f} | {c['us_per_series_bucket']:.1f} | "
            f"{' / '.join(str(q) for q in c['queries_per_call'])} | {s['wall_s'] * 1000:.1f} | "
            f"{s['cpu_s'] * 1000:.1f} | {s['us_per_series_bucket']:.1f} | {s['queries']:g} | "
            f"{ratio['steady_wall']:.2f} | {ratio['steady_queries']:.2f} |"
        )
    print(f"\nsteady capacity: {result['steady_capacity']}")
    for row in result["profiled_beat"]["top"]:
        print(f"  {row['cumulative_s']:8.3f} s {row['calls']:7d}  {row['function']}")


# ---- one sparse source over years (--sparse) ---------------------------------------------


def sparse_rows(source_id: int, n: int, years: float, rng: np.random.Generator) -> str:
    """``n`` enriched events (labels as the stream's, no terms) at random over the
    ``years`` of event time before ``ORIGIN``, as COPY text rows, oldest first."""
    span = years * 365 * 86400
    epochs = ORIGIN.timestamp() - span + np.sort(rng.uniform(0, span, n))
    labels = rng.choice(3, n, p=[0.25, 0.45, 0.30])
    lines = []
    for i in range(n):
        created = datetime.fromtimestamp(float(epochs[i]), UTC)
        received = (created + timedelta(seconds=2)).isoformat()
        label = LABELS[labels[i]]
        lines.append(
            f"{source_id}\titem-{i}\t{created.isoformat()}\t{received}\t"
            f"a{i}\tuser{i}\tUser {i}\tfeed item {i}\ten\t\t\t\t\t"
            f"{{}}\t{{}}\t{{}}\t{{}}\t{{}}\t{{}}\t{{}}\t"
            f"{SENTIMENT[label]}\t{received}\t{label}\tvader\n"
        )
    return "".join(lines)


def sparse_setup(options: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """The sparse source and its events; its id and a summary."""
    run = uuid.uuid4().hex[:8]
    team = Team.objects.create(name=f"bench anomaly {run}", slug=f"{SLUG}{run}")
    source = Source.objects.create(team=team, kind="rss", name=f"sparse-{run}")
    StreamClock.objects.create(source=source, watermark=None, bucket_s=900)
    text = sparse_rows(
        source.id, options.sparse_events, options.sparse_years, np.random.default_rng(options.seed)
    )
    with connection.cursor() as cursor:
        cursor.cursor.copy_expert(f"COPY ingest_event ({COLUMNS}) FROM STDIN", io.StringIO(text))
        cursor.execute("ANALYZE ingest_event")
    return source.id, {"events": options.sparse_events, "years": options.sparse_years}


def stage_snapshot(source_id: int) -> dict[str, Any]:
    """What the stage wrote for the source (points, anomalies, states), without ids."""
    key = dict(Series.objects.filter(source_id=source_id).values_list("id", "kind"))
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT p.series_id, p.bucket_start, p.value, p.expected, p.low, p.high, p.score, "
            "p.anomaly FROM mlengine_seriespoint p JOIN mlengine_series s "
            "ON p.series_id = s.id WHERE s.source_id = %s",
            [source_id],
        )
        points = {(key[r[0]], r[1]): r[2:] for r in cursor.fetchall()}
    anomalies = {
        (key[a[0]], a[1]): a[2:]
        for a in Anomaly.objects.filter(source_id=source_id).values_list(
            "series_id", "window_start", "window_end", "score", "value", "closed"
        )
    }
    states = {
        key[i]: (bytes(state) if state is not None else None, last)
        for i, state, last in Series.objects.filter(source_id=source_id).values_list(
            "id", "state", "last_bucket"
        )
    }
    return {"points": points, "anomalies": anomalies, "states": states}


def catch_up_timed(
    source_id: int, watermark: datetime, bulk: BulkStatements, *, jump: bool
) -> dict[str, Any]:
    """The source's stage state deleted, its clock set to ``watermark``, and calls until
    no complete bucket is left: their figures summed (and the largest call's)."""
    reset_state([source_id])
    StreamClock.objects.filter(source_id=source_id).update(watermark=watermark)
    calls = [timed_call([source_id], bulk, jump=jump)]
    while calls[-1]["more"]:
        calls.append(timed_call([source_id], bulk, jump=jump))
    buckets = sum(c["buckets"] for c in calls)
    wall = sum(c["wall_s"] for c in calls)
    return {
        "calls": len(calls),
        "wall_s": round(wall, 3),
        "cpu_s": round(sum(c["cpu_s"] for c in calls), 3),
        "max_call_wall_s": max(c["wall_s"] for c in calls),
        "buckets": buckets,
        "steps": sum(c["steps"] for c in calls),
        "jumps": sum(c["jumps"] for c in calls),
        "queries": sum(c["queries"] for c in calls),
        "us_per_bucket": round(wall * 1e6 / max(buckets, 1), 2),
        "call_wall_s": [c["wall_s"] for c in calls],
    }


def sparse_scenario(
    source_id: int, options: argparse.Namespace, bulk: BulkStatements
) -> dict[str, Any]:
    """``--runs`` repetitions of: the first ``--baseline-days`` stepped and jumped (and
    compared), the whole span jumped. Medians, and the whole span stepped, extrapolated."""
    first = Source.objects.get(id=source_id).events.order_by("created_at").first()
    assert first is not None
    prefix_end = first.created_at + timedelta(days=options.baseline_days)
    full_end = ORIGIN
    reps = []
    for _ in range(options.runs):
        stepped = catch_up_timed(source_id, prefix_end, bulk, jump=False)
        reference = stage_snapshot(source_id)
        jumped = catch_up_timed(source_id, prefix_end, bulk, jump=True)
        identical = stage_snapshot(source_id) == reference
        full = catch_up_timed(source_id, full_end, bulk, jump=True)
        reps.append(
            {
                "prefix_stepped": stepped,
                "prefix_jumped": jumped,
                "identical": identical,
                "full_jumped": full,
            }
        )
        print(
            f"prefix {stepped['buckets']} buckets: stepped {stepped['wall_s']} s, jumped "
            f"{jumped['wall_s']} s (identical: {identical}); {full['buckets']} buckets jumped "
            f"in {full['wall_s']} s, {full['calls']} calls",
            flush=True,
        )

    def med(part: str, field: str) -> float:
        return round(statistics.median(r[part][field] for r in reps), 4)

    per_bucket = med("prefix_stepped", "wall_s") / reps[0]["prefix_stepped"]["buckets"]
    full_buckets = reps[0]["full_jumped"]["buckets"]
    summary = {
        "prefix": {
            "days": options.baseline_days,
            "buckets": reps[0]["prefix_stepped"]["buckets"],
            "stepped": {
                f: med("prefix_stepped", f)
                for f in ("wall_s", "cpu_s", "calls", "steps", "queries")
            },
            "jumped": {
                f: med("prefix_jumped", f)
                for f in ("wall_s", "cpu_s", "calls", "steps", "jumps", "queries")
            },
            "identical": all(r["identical"] for r in reps),
        },
        "full": {
            "years": options.sparse_years,
            "buckets": full_buckets,
            "jumped": {
                f: med("full_jumped", f)
                for f in (
                    "wall_s",
                    "cpu_s",
                    "calls",
                    "steps",
                    "jumps",
                    "queries",
                    "max_call_wall_s",
                )
            },
            "stepped_extrapolated_s": round(per_bucket * full_buckets, 1),
        },
        "repetitions": reps,
    }
    summary["prefix"]["speedup"] = round(
        summary["prefix"]["stepped"]["wall_s"] / summary["prefix"]["jumped"]["wall_s"], 1
    )
    summary["full"]["speedup_extrapolated"] = round(
        summary["full"]["stepped_extrapolated_s"] / summary["full"]["jumped"]["wall_s"], 1
    )
    return summary


def plot_sparse(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sparse = result["sparse"]
    prefix, full = sparse["prefix"], sparse["full"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [
        f"first {prefix['days']} days\nstepped",
        f"first {prefix['days']} days\njumped",
        f"{full['years']:g} years\njumped",
        f"{full['years']:g} years\nstepped (extrapolated)",
    ]
    seconds = [
        prefix["stepped"]["wall_s"],
        prefix["jumped"]["wall_s"],
        full["jumped"]["wall_s"],
        full["stepped_extrapolated_s"],
    ]
    bars = axes[0].bar(labels, seconds, color=["#999", "#2a7", "#2a7", "#ccc"])
    bars[3].set_hatch("//")
    for bar, value in zip(bars, seconds, strict=True):
        axes[0].annotate(
            f"{value:.2f} s",
            (bar.get_x() + bar.get_width() / 2, value),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    axes[0].set(title="Catch-up, stage wall seconds", ylabel="s", yscale="log")
    axes[0].tick_params(axis="x", labelsize=8)
    calls = sparse["repetitions"][-1]["full_jumped"]["call_wall_s"]
    axes[1].bar(range(1, len(calls) + 1), [c * 1000 for c in calls], color="#2a7")
    axes[1].set(title=f"{full['years']:g} years jumped: each call", xlabel="call", ylabel="wall ms")
    config = result["config"]
    fig.suptitle(
        f"advance_anomalies, one source: {config['sparse_events']} events over "
        f"{config['sparse_years']:g} years; medians of {config['runs']} runs; "
        f"{config['cpu']['model']}"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def cpu() -> dict[str, Any]:
    """The CPU this ran on: its model (``lscpu``) and whether it has AVX-512 (numpy's
    runtime detection)."""
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in out.splitlines()
                if line.startswith("Model name")
            ),
            model,
        )
    except OSError:
        pass
    from numpy._core._multiarray_umath import __cpu_features__ as features  # type: ignore[attr-defined]

    return {"model": model, "cores": os.cpu_count(), "avx512f": bool(features.get("AVX512F"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", default="1,10,50", help="comma-separated N")
    parser.add_argument("--rate", type=float, default=20.0, help="events per 5-minute bucket")
    parser.add_argument("--hours", type=float, default=37.0, help="event time before steady")
    parser.add_argument("--terms", type=int, default=20, help="trending terms per source")
    parser.add_argument("--beats", type=int, default=5, help="steady beats per repetition")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the largest N's last repetition, one more beat under cProfile",
    )
    parser.add_argument("--keep", action="store_true", help="keep the bench data at the end")
    parser.add_argument(
        "--sparse", action="store_true", help="one source with events years apart instead"
    )
    parser.add_argument("--sparse-years", type=float, default=5.0)
    parser.add_argument("--sparse-events", type=int, default=300)
    parser.add_argument(
        "--baseline-days", type=int, default=30, help="days stepped bucket by bucket (--sparse)"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    options = parser.parse_args()
    sizes = sorted({int(n) for n in options.sources.split(",")})
    remove_bench_data()
    foreign = StreamClock.objects.filter(watermark__isnull=False).count()
    if foreign:
        print(f"{foreign} other sources have a stream clock: use a scratch database")
        return 2
    if options.sparse:
        return main_sparse(options)
    source_ids, data = setup(max(sizes), options)
    print(
        f"{data['events']} events ({data['events_per_source']}/source), {data['trends']} trends, "
        f"inserted in {data['insert_s']} s",
        flush=True,
    )
    bulk = BulkStatements()
    results = []
    try:
        with (
            mock.patch("twiscope.pipeline.app.send_task"),
            mock.patch.object(persistence, "execute_values", bulk),
            mock.patch.object(persistence, "copy_points", bulk.copy),
        ):
            for n in sizes:
                reps = [
                    one_repetition(
                        source_ids,
                        n,
                        options,
                        bulk,
                        profile=options.profile and n == sizes[-1] and r == options.runs - 1,
                    )
                    for r in range(options.runs)
                ]
                results.append(summarise(n, reps))
                row = results[-1]
                print(
                    f"N={n}: {row['series']} series, catch-up {row['catch_up']['wall_s']} s, "
                    f"steady beat {row['steady']['wall_s'] * 1000:.1f} ms",
                    flush=True,
                )
    finally:
        if not options.keep:
            remove_bench_data()
    base = results[0]
    for row in results:
        row["ratio_to_smallest"] = {
            "sources": row["sources"] / base["sources"],
            "steady_wall": round(row["steady"]["wall_s"] / base["steady"]["wall_s"], 2),
            "steady_queries": round(row["steady"]["queries"] / base["steady"]["queries"], 2),
            "catch_up_wall": round(row["catch_up"]["wall_s"] / base["catch_up"]["wall_s"], 2),
        }
    result = {
        "config": {
            "sources": sizes,
            "rate": options.rate,
            "hours": options.hours,
            "terms": options.terms,
            "beats": options.beats,
            "runs": options.runs,
            "seed": options.seed,
            "max_buckets": settings.ANOMALY_MAX_BUCKETS,
            "max_terms": settings.ANOMALY_MAX_TERMS,
            "revision": revision(),
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "cpu": cpu(),
        },
        "data": data,
        "results": results,
        "steady_capacity": capacity(results),
        "profiled_beat": {
            "sources": sizes[-1],
            "top": results[-1]["repetitions"][-1]["profiled_beat"],
        },
    }
    print_table(result)
    if options.json:
        options.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if options.plot:
        plot(result, options.plot)
    return 0


def main_sparse(options: argparse.Namespace) -> int:
    """The ``--sparse`` scenario: set up, measure, report (table, JSON, plot)."""
    source_id, data = sparse_setup(options)
    bulk = BulkStatements()
    try:
        with (
            mock.patch("twiscope.pipeline.app.send_task"),
            mock.patch.object(persistence, "execute_values", bulk),
            mock.patch.object(persistence, "copy_points", bulk.copy),
        ):
            sparse = sparse_scenario(source_id, options, bulk)
    finally:
        if not options.keep:
            remove_bench_data()
    result = {
        "config": {
            "sparse_years": options.sparse_years,
            "sparse_events": options.sparse_events,
            "baseline_days": options.baseline_days,
            "runs": options.runs,
            "seed": options.seed,
            "max_buckets": settings.ANOMALY_MAX_BUCKETS,
            "jump_cost": settings.ANOMALY_JUMP_COST,
            "max_points": settings.ANOMALY_MAX_POINTS,
            "jump_min": anomaly_stage.JUMP_MIN,
            "revision": revision(),
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "cpu": cpu(),
        },
        "data": data,
        "sparse": sparse,
    }
    prefix, full = sparse["prefix"], sparse["full"]
    print(
        "\n| span | buckets | stepped s | jumped s | speed-up | calls (stepped / jumped) | "
        "bucket steps + jumps | largest call s |"
    )
    print("|---" * 8 + "|")
    print(
        f"| first {prefix['days']} days | {prefix['buckets']} | "
        f"{prefix['stepped']['wall_s']:.2f} | {prefix['jumped']['wall_s']:.2f} | "
        f"{prefix['speedup']}× | "
        f"{prefix['stepped']['calls']:g} / {prefix['jumped']['calls']:g} | "
        f"{prefix['jumped']['steps']:g} + {prefix['jumped']['jumps']:g} | |"
    )
    print(
        f"| {full['years']:g} years | {full['buckets']} | {full['stepped_extrapolated_s']:.0f} "
        f"(extrapolated) | {full['jumped']['wall_s']:.2f} | {full['speedup_extrapolated']}× | "
        f"– / {full['jumped']['calls']:g} | {full['jumped']['steps']:g} + "
        f"{full['jumped']['jumps']:g} | {full['jumped']['max_call_wall_s']:.2f} |"
    )
    print(f"identical results: {prefix['identical']}; cpu: {result['config']['cpu']}")
    if options.json:
        options.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if options.plot:
        plot_sparse(result, options.plot)
    return 0 if prefix["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
