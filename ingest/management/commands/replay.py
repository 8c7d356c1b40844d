"""``manage.py replay PATH``: replay an archive file into the pipeline, in event time.

Reads the whole archive (these files hold at most tens of thousands of rows), sorts its
posts by event time, and hands them to the ingest queue in batches of
``settings.INGEST_BATCH_SIZE``; with ``--speed N`` the gaps between events are replayed
N times faster than they happened, with ``--rate N`` at a steady N events per second.
Unusable rows become dead letters (stage ``replay``). Each batch declares its last event
time as the source's watermark; at the end the trend stage is told the stream is
complete, so its last buckets close.

An outage of PostgreSQL or Redis while it sends or waits does not end it: it says so on
stderr, waits with backoff, stages again the batches of the last seconds before the
outage (the store may have lost them; the database ignores what comes twice) and goes
on from the batch it was at (``ingest.replaying.OutageProofStager``); it fails only
after ``OUTAGE_GIVE_UP_S`` of one outage, with a message, not a traceback.

On a terminal, a progress bar on stderr shows the event time reached (its length is the
archive's event-time span) and the events sent; it is silent when stderr is not a TTY.
stdout gets the summary: what was read, sent and skipped, then, with ``--wait``, what
the pipeline did with it (events stored new, duplicates, dead letters), once it drained.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Any

import structlog
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from ingest import counters, persistence, selectors, services
from ingest.envelope import Envelope
from ingest.models import DeadLetter, Source
from ingest.replaying import (
    OUTAGE_GIVE_UP_S,
    BarStream,
    EventTimeBar,
    OutageProofStager,
    Outcome,
    paced_batches,
)
from ingest.sources.replay.adapter import ReplayAdapter
from ingest.sources.replay.formats import (
    FORMATS,
    ArchiveFormatError,
    detect_format,
    read_archive,
)
from ingest.sources.replay.rows import RowError
from teams.models import DEMO_TEAM_SLUG, Team
from twiscope import celery, pipeline
from twiscope.outage import DEPENDENCY_ERRORS, Dependency

log = structlog.get_logger(__name__)

DEAD_LETTER_CHUNK = 1_000
SOURCE_NAME_MAX = 100
TEAM_VARIABLE = "TWISCOPE_TEAM"
"""The environment variable behind ``settings.TWISCOPE_TEAM``: the team a replay goes to
when ``--team`` is not given (see ``_team``)."""
DEFAULT_WAIT_S = 600.0
"""``--wait`` with no value: how long to wait for the pipeline to drain, in seconds."""
DRAIN_POLL_S = 0.5
DRAIN_QUIET_POLLS = 4
"""The pipeline counts as drained after this many consecutive polls found it idle: a
task a worker is running holds no queued message, so one idle look is not proof."""


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


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be events per second, not {value!r}") from None
    if not 0 < rate < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {value!r}")
    return rate


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds, not {value!r} (put --wait after PATH)"
        ) from None
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {value!r}")
    return number


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
    # The system checks (0.13 s of a replay's start) belong to the platform's start
    # (`make run`, `migrate`), not to every replay: a replay only reads and enqueues.
    requires_system_checks: list[str] = []

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
            "--rate",
            type=_rate,
            default=None,
            help="replay at a steady N events per second of wall time, whatever the"
            " archive's gaps (instead of --speed)",
        )
        parser.add_argument(
            "--limit", type=_positive_int, default=None, help="stop after N rows read"
        )
        parser.add_argument(
            "--source", dest="source_name", default=None, help="source name (default: file stem)"
        )
        parser.add_argument(
            "--team",
            default=None,
            metavar="SLUG",
            help=f"the team whose source it is (default: ${TEAM_VARIABLE}, else the only "
            f"team, else the team {DEMO_TEAM_SLUG!r} that make run creates)",
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
            "--wait",
            type=_seconds,
            nargs="?",
            const=DEFAULT_WAIT_S,
            default=None,
            metavar="SECONDS",
            help="after sending, wait (up to SECONDS, default "
            f"{DEFAULT_WAIT_S:.0f}) for the pipeline to drain, then report what it stored: "
            "new events, duplicates, dead letters; exits 1 if it does not drain in time",
        )
        parser.add_argument(
            "--bucket-s",
            type=_positive_int,
            default=None,
            help="trend bucket in seconds for a new source (default: sized from the "
            "archive's mean daily volume by the trend stage)",
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
        rate: float | None = options["rate"]
        if speed is not None and rate is not None:
            raise CommandError("give --speed or --rate, not both")
        wait_s: float | None = options["wait"]
        if not path.is_file():
            raise CommandError(f"no such file: {path}")
        try:
            fmt = options["fmt"] or detect_format(path)
        except ArchiveFormatError as exc:
            raise CommandError(f"{exc}; pass --format to name it") from exc
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc}") from exc
        team, why = _team(options["team"], settings.TWISCOPE_TEAM)
        if why is not None:
            self.stderr.write(
                f'replay into team "{team.name}" ({team.slug}): {why}; pick another with '
                f"--team SLUG or {TEAM_VARIABLE}=SLUG"
            )
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
        if not source.enabled:
            # Its batches would be dropped at ingest: say so rather than send them.
            raise CommandError(
                f'source "{source.name}" (id {source.id}) is disabled'
                f"{': ' + source.disabled_reason if source.disabled_reason else ''}; "
                "enable it (admin) or replay into another with --source"
            )
        before = selectors.source_counts(source.id) if wait_s is not None else None
        if envelopes or options["bucket_s"]:
            services.describe_stream(
                source=source,
                event_times=[envelope.created_at for envelope in envelopes],
                trend_bucket_s=options["bucket_s"],
            )
        replay_dead = _dead_letter(source, path, fmt, errors)
        envelopes.sort(key=lambda envelope: envelope.created_at)
        log.info(
            "replay.started",
            source_id=source.id,
            path=str(path),
            format=fmt,
            events=len(envelopes),
            skipped=len(errors),
            speed=speed or (f"{rate:g}/s" if rate else "max"),
        )

        stager = OutageProofStager(
            lambda batch: persistence.enqueue_envelopes(
                source=source, envelopes=batch, watermark=batch[-1].created_at
            ),
            on_wait=self._tell_waiting,
        )
        try:
            batches = self._send(source, envelopes, speed, rate, stager)
            if envelopes:
                stager.call(
                    "replay.end_of_stream",
                    lambda: persistence.end_of_stream(
                        source=source, event_time=envelopes[-1].created_at
                    ),
                )
        except DEPENDENCY_ERRORS as exc:
            raise CommandError(
                f"gave up after {OUTAGE_GIVE_UP_S:.0f} s of an outage: {exc}; the batches "
                "staged so far are kept, and replaying the file again stores only what is "
                "missing"
            ) from exc

        elapsed = time.monotonic() - started
        reasons = Counter(error.category for error in errors)
        log.info(
            "replay.finished",
            source_id=source.id,
            enqueued=len(envelopes),
            batches=batches,
            skipped=len(errors),
            outages=stager.outages,
            resent_batches=stager.resent_batches,
            seconds=round(elapsed, 3),
        )
        self.stdout.write(
            f'replay {path.name} ({fmt}) into source "{source.name}" (id {source.id}): '
            f"read {len(envelopes) + len(errors)}, enqueued {len(envelopes)} in {batches} "
            f"batches, skipped {len(errors)}{_reasons_text(reasons)}, {elapsed:.1f} s"
        )
        if before is None or wait_s is None:
            self.stdout.write(
                f"sent {len(envelopes)} events (not yet stored: the pipeline is still "
                "working on them); pass --wait to wait for it and report what it stored "
                "(new, duplicates, dead letters)"
            )
            return
        try:
            drained, waited = self._drain(source, wait_s, stager)
            after = stager.call("replay.counts", lambda: selectors.source_counts(source.id))
        except DEPENDENCY_ERRORS as exc:
            raise CommandError(
                f"gave up waiting for the pipeline after {OUTAGE_GIVE_UP_S:.0f} s of an "
                f"outage: {exc}"
            ) from exc
        outcome = Outcome.between(
            before,
            after,
            sent=len(envelopes),
            replay_dead=replay_dead,
            repeated_in_archive=len(envelopes) - len({e.external_id for e in envelopes}),
        )
        log.info(
            "replay.drained" if drained else "replay.drain_timeout",
            source_id=source.id,
            stored=outcome.stored,
            duplicates=outcome.duplicates,
            ingest_dead_letters=outcome.ingest_dead_letters,
            replay_dead_letters=outcome.replay_dead_letters,
            seconds=round(waited, 3),
        )
        if drained:
            self.stdout.write(f"{outcome.text()}; the pipeline drained in {waited:.1f} s")
            return
        self.stdout.write(f"so far {outcome.text()}")
        raise CommandError(
            f"the pipeline did not drain within {wait_s:g} s: {self._backlog(source)}; "
            "are the worker pools running? (the numbers above are not final)"
        )

    def _tell_waiting(self, dependency: Dependency, exc: BaseException, delay_s: float) -> None:
        self.stderr.write(
            f"replay: the {dependency} is unavailable ({type(exc).__name__}); "
            f"trying again in {delay_s:.1f} s"
        )

    def _send(
        self,
        source: Source,
        envelopes: list[Envelope],
        speed: float | None,
        rate: float | None,
        stager: OutageProofStager,
    ) -> int:
        """Hand ``envelopes`` (sorted by event time) to the ingest queue, paced by
        ``speed`` or ``rate`` (``paced_batches``), each batch declaring its last event
        time as the source's watermark, through ``stager`` (which waits out outages).
        Returns how many batches."""
        if not envelopes:
            return 0
        bar = EventTimeBar(
            BarStream(self.stderr),
            first=envelopes[0].created_at,
            last=envelopes[-1].created_at,
            total=len(envelopes),
        )
        batches = 0
        try:
            for batch in paced_batches(
                envelopes, speed=speed, rate=rate, batch_size=settings.INGEST_BATCH_SIZE
            ):
                # Back-pressure: never more than REPLAY_MAX_IN_FLIGHT events in the
                # pipeline, so "max" means as fast as the pipeline takes them and an
                # event's latency is the pipeline's, not a backlog's.
                try:
                    stager.call(
                        "replay.wait_for_capacity",
                        lambda: persistence.wait_for_capacity(
                            source=source, max_in_flight=settings.REPLAY_MAX_IN_FLIGHT
                        ),
                    )
                except TimeoutError as exc:
                    raise CommandError(f"replay stalled after {batches} batches: {exc}") from exc
                # Sorted by event time: every later event is at or after this batch's
                # last, which is the source's watermark (the stager's ``stage``).
                stager.send(batch)
                batches += 1
                bar.advance(batch[-1].created_at, len(batch))
        finally:
            bar.close()
        return batches

    def _drain(
        self, source: Source, timeout_s: float, stager: OutageProofStager
    ) -> tuple[bool, float]:
        """Wait until no batch of ``source`` is staged, none of its events is waiting for
        enrichment, and ``twiscope.pipeline.is_idle()`` held for ``DRAIN_QUIET_POLLS``
        polls in a row (each poll waits out an outage through ``stager``). Returns
        ``(drained, seconds waited)``."""
        started = time.monotonic()
        quiet = 0
        with tqdm(
            file=BarStream(self.stderr),
            disable=None,
            leave=False,
            bar_format="waiting for the pipeline to drain{postfix} [{elapsed}]",
        ) as bar:
            while True:
                in_flight, idle = stager.call(
                    "replay.drain",
                    lambda: (counters.in_flight_events(source.id), pipeline.is_idle()),
                )
                quiet = quiet + 1 if in_flight == 0 and idle else 0
                waited = time.monotonic() - started
                if quiet >= DRAIN_QUIET_POLLS:
                    return True, waited
                if waited >= timeout_s:
                    return False, waited
                bar.set_postfix_str(f"~{in_flight} events of this source in flight")
                time.sleep(min(DRAIN_POLL_S, max(timeout_s - waited, 0.0)))

    def _backlog(self, source: Source) -> str:
        """What is still in the pipeline, in words (for the timeout message)."""
        staged = counters.staged_batches(source.id)
        in_flight = counters.in_flight_events(source.id)
        depths = pipeline.queue_depths()
        dispatched = {stage: pipeline.dispatched_count(stage) for stage in pipeline.STAGES}
        return (
            f"{staged} batches of this source staged, ~{in_flight} of its events in flight; "
            "queued messages "
            + ", ".join(f"{stage} {n}" for stage, n in depths.items())
            + "; unfinished dispatches "
            + ", ".join(f"{stage} {n}" for stage, n in dispatched.items())
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


def _team(slug: str | None, default: str) -> tuple[Team, str | None]:
    """The team to replay into, and why it was chosen when that is worth saying.

    In order: ``slug`` (``--team``); ``default`` (``settings.TWISCOPE_TEAM``, from the
    environment variable of that name), when not empty; the only team; with
    several, the demo team that ``make run`` creates (``DEMO_TEAM_SLUG``), so that the
    README's commands work as typed once a second team exists. The reason is ``None``
    for ``--team`` and for the only team (nothing to explain).

    Raises:
        CommandError: no such slug, no team at all, or several teams, none of them the
            demo team, and no slug.
    """
    slugs = list(Team.objects.order_by("slug").values_list("slug", flat=True))
    why: str | None = None
    origin = ""
    if slug is None and default:
        slug, why = default, f"set by {TEAM_VARIABLE}"
        origin = f" (set by {TEAM_VARIABLE})"
    elif slug is None and len(slugs) == 1:
        slug = slugs[0]
    elif slug is None and DEMO_TEAM_SLUG in slugs:
        slug, why = DEMO_TEAM_SLUG, f"the team make run creates, of {len(slugs)} teams"
    if slug is None and not slugs:
        raise CommandError("no team exists yet: create one before replaying into it")
    if slug is None:
        raise CommandError(
            f"there are several teams; pass --team with one of: {', '.join(slugs)} "
            f"(or set {TEAM_VARIABLE})"
        )
    team = Team.objects.filter(slug=slug).first()
    if team is None:
        known = ", ".join(slugs) or "none"
        raise CommandError(f"no team with slug {slug!r}{origin} (teams: {known})")
    return team, why


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


def _dead_letter(source: Source, path: Path, fmt: str, errors: list[RowError]) -> int:
    """One dead letter per unusable row: its reason, and where and what it was. Returns
    how many were parked."""
    parked = 0
    for start in range(0, len(errors), DEAD_LETTER_CHUNK):
        chunk = errors[start : start + DEAD_LETTER_CHUNK]
        parked += services.record_dead_letters(
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
    return parked


def _reasons_text(reasons: Counter[str]) -> str:
    if not reasons:
        return ""
    return " (" + ", ".join(f"{reason} {count}" for reason, count in reasons.most_common()) + ")"
