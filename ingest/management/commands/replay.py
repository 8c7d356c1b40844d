"""``manage.py replay PATH``: replay an archive file into the pipeline, in event time.

Reads the whole archive (these files hold at most tens of thousands of rows), sorts its
posts by event time, and hands them to the ingest queue in batches of
``settings.INGEST_BATCH_SIZE``; with ``--speed N`` the gaps between events are replayed
N times faster than they happened. Unusable rows become dead letters (stage
``replay``). At the end the trend stage is told the stream is complete, so its last
buckets close.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import structlog
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from dashboard.models import Team
from ingest import services
from ingest.envelope import Envelope
from ingest.models import DeadLetter, Source
from ingest.sources.replay.adapter import ReplayAdapter
from ingest.sources.replay.formats import (
    FORMATS,
    ArchiveFormatError,
    RowError,
    detect_format,
    read_archive,
)
from mlengine.facade import suggest_trend_bucket_s
from twiscope import celery

log = structlog.get_logger(__name__)

FLUSH_WINDOW_S = 0.2
"""With ``--speed``, a batch spans at most this much wall time of the replay schedule,
so no event waits longer than about this for its batch to fill."""
DEAD_LETTER_CHUNK = 1_000
SOURCE_NAME_MAX = 100


def paced_batches(
    envelopes: Sequence[Envelope],
    *,
    speed: float | None,
    batch_size: int,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[list[Envelope]]:
    """Yield ``envelopes`` (sorted by ``created_at``) in batches, each when it is due.

    ``speed`` None: batches of ``batch_size`` as fast as the consumer takes them.
    ``speed`` > 0: an event is due ``(created_at - first created_at) / speed`` seconds
    of ``clock`` after the first ``next``; the generator sleeps until each event is due
    before adding it to the batch, and yields a batch when it is full or when the next
    event is due more than ``FLUSH_WINDOW_S`` after the batch's first, so a slow replay
    is not held back waiting for a batch to fill. Time spent by the consumer between
    batches counts against the schedule (a slow consumer is caught up, not added to).
    """
    if speed is None:
        for start in range(0, len(envelopes), batch_size):
            yield list(envelopes[start : start + batch_size])
        return
    if not envelopes:
        return
    origin = envelopes[0].created_at
    started = clock()
    batch: list[Envelope] = []
    batch_due = 0.0
    for envelope in envelopes:
        due = (envelope.created_at - origin).total_seconds() / speed
        if batch and due - batch_due > FLUSH_WINDOW_S:
            yield batch
            batch = []
        wait = started + due - clock()
        if wait > 0:
            sleep(wait)
        if not batch:
            batch_due = due
        batch.append(envelope)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _speed(value: str) -> float | None:
    if value == "max":
        return None
    try:
        speed = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'max' or a number, not {value!r}") from None
    if not speed > 0 or speed == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {value!r}")
    return speed


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


class Command(BaseCommand):
    help = (
        "Replay an archive (airline/trump/CrisisLexT26 CSV, Telegram JSON, X v2/v1.1 "
        "JSONL) into a replay source, sorted by event time, optionally paced."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", type=Path, help="the archive file")
        parser.add_argument(
            "--speed",
            type=_speed,
            default=None,
            metavar="N|max",
            help="replay event-time gaps N times faster; 'max' (default): no pacing",
        )
        parser.add_argument(
            "--limit", type=_positive_int, default=None, help="stop after N rows read"
        )
        parser.add_argument(
            "--source", dest="source_name", default=None, help="source name (default: file stem)"
        )
        parser.add_argument(
            "--team", default=None, help="team slug (default: the only team, if one)"
        )
        parser.add_argument(
            "--wait-workers",
            type=float,
            default=60.0,
            metavar="SECONDS",
            help="wait up to this long for a worker on every pipeline queue before "
            "replaying (0: do not wait); default 60",
        )
        parser.add_argument(
            "--bucket-s",
            type=_positive_int,
            default=None,
            help="trend bucket in seconds for a new source (default: sized from the "
            "archive's median daily volume)",
        )
        parser.add_argument(
            "--format",
            dest="fmt",
            choices=FORMATS,
            default=None,
            help="archive format (default: detected from content)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        started = time.monotonic()
        path: Path = options["path"]
        speed: float | None = options["speed"]
        if not path.is_file():
            raise CommandError(f"no such file: {path}")
        try:
            fmt = options["fmt"] or detect_format(path)
        except ArchiveFormatError as exc:
            raise CommandError(f"{exc}; pass --format to name it") from exc
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc}") from exc
        team = _team(options["team"])
        name = (options["source_name"] or path.stem)[:SOURCE_NAME_MAX]
        envelopes, errors = _read(path, fmt, options["limit"])
        self._wait_for_workers(options["wait_workers"])
        try:
            source = services.get_or_create_source(
                team=team,
                kind=ReplayAdapter.kind,
                name=name,
                config={"path": str(path.resolve()), "format": fmt},
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if source.trend_bucket_s is None and (envelopes or options["bucket_s"]):
            bucket_s = options["bucket_s"] or suggest_trend_bucket_s(
                envelope.created_at for envelope in envelopes
            )
            services.set_trend_bucket(source=source, bucket_s=bucket_s)
        _dead_letter(source, path, fmt, errors)
        envelopes.sort(key=lambda envelope: envelope.created_at)
        log.info(
            "replay.started",
            source_id=source.id,
            path=str(path),
            format=fmt,
            events=len(envelopes),
            skipped=len(errors),
            speed=speed or "max",
            trend_bucket_s=source.trend_bucket_s,
        )

        batches = 0
        with tqdm(
            total=len(envelopes), unit="event", file=sys.stderr, disable=None, leave=False
        ) as bar:
            for batch in paced_batches(
                envelopes, speed=speed, batch_size=settings.INGEST_BATCH_SIZE
            ):
                # Back-pressure: never more than REPLAY_MAX_IN_FLIGHT events in the
                # pipeline, so "max" means as fast as the pipeline takes them and an
                # event's latency is the pipeline's, not a backlog's.
                services.wait_for_capacity(
                    source=source, max_in_flight=settings.REPLAY_MAX_IN_FLIGHT
                )
                services.enqueue_envelopes(source=source, envelopes=batch)
                batches += 1
                bar.update(len(batch))
        if envelopes:
            services.end_of_stream(source=source, event_time=envelopes[-1].created_at)

        elapsed = time.monotonic() - started
        reasons = Counter(error.category for error in errors)
        log.info(
            "replay.finished",
            source_id=source.id,
            enqueued=len(envelopes),
            batches=batches,
            skipped=len(errors),
            seconds=round(elapsed, 3),
        )
        self.stdout.write(
            f'replay {path.name} ({fmt}) into source "{source.name}" (id {source.id}): '
            f"read {len(envelopes) + len(errors)}, enqueued {len(envelopes)} in {batches} "
            f"batches, skipped {len(errors)}{_reasons_text(reasons)}, "
            f"trend bucket {source.trend_bucket_s} s, {elapsed:.1f} s"
        )

    def _wait_for_workers(self, timeout_s: float) -> None:
        """Wait until every pipeline queue has a consumer, so a replay started together
        with the platform does not measure the workers' start as pipeline latency.
        Proceeds (with a warning) when they do not come: the tasks wait in the broker."""
        if timeout_s <= 0:
            return
        deadline = time.monotonic() + timeout_s
        missing = celery.missing_consumers()
        if missing:
            self.stderr.write(f"waiting for worker pools: {', '.join(sorted(missing))}")
        while missing and time.monotonic() < deadline:
            time.sleep(1)
            missing = celery.missing_consumers()
        if missing:
            self.stderr.write(
                f"no worker consumes {', '.join(sorted(missing))} after {timeout_s:.0f} s; "
                "replaying anyway (the tasks wait in the broker)"
            )


def _team(slug: str | None) -> Team:
    """The team named by ``slug``, else the only team.

    Raises:
        CommandError: no such slug, no team at all, or several teams and no slug.
    """
    slugs = list(Team.objects.order_by("slug").values_list("slug", flat=True))
    if slug is None and len(slugs) == 1:
        slug = slugs[0]
    if slug is None and not slugs:
        raise CommandError("no team exists yet: create one before replaying into it")
    if slug is None:
        raise CommandError(f"there are several teams; pass --team with one of: {', '.join(slugs)}")
    team = Team.objects.filter(slug=slug).first()
    if team is None:
        known = ", ".join(slugs) or "none"
        raise CommandError(f"no team with slug {slug!r} (teams: {known})")
    return team


def _read(path: Path, fmt: str, limit: int | None) -> tuple[list[Envelope], list[RowError]]:
    """All envelopes and row errors of the first ``limit`` rows (all when None)."""
    envelopes: list[Envelope] = []
    errors: list[RowError] = []
    try:
        for item in read_archive(path, fmt):
            if isinstance(item, RowError):
                errors.append(item)
            else:
                envelopes.append(item)
            if limit is not None and len(envelopes) + len(errors) >= limit:
                break
    except OSError as exc:
        raise CommandError(f"reading {path} failed: {exc}") from exc
    return envelopes, errors


def _dead_letter(source: Source, path: Path, fmt: str, errors: list[RowError]) -> None:
    """One dead letter per unusable row: its reason, and where and what it was."""
    for start in range(0, len(errors), DEAD_LETTER_CHUNK):
        chunk = errors[start : start + DEAD_LETTER_CHUNK]
        services.record_dead_letters(
            stage=DeadLetter.Stage.REPLAY,
            source=source,
            items=[
                (
                    error.reason,
                    {"path": str(path), "format": fmt, "line": error.line, "raw": error.raw},
                )
                for error in chunk
            ],
        )


def _reasons_text(reasons: Counter[str]) -> str:
    if not reasons:
        return ""
    return " (" + ", ".join(f"{reason} {count}" for reason, count in reasons.most_common()) + ")"
