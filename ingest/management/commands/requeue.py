"""``manage.py requeue``: re-drive dead letters of the enrich, detect and alerts stages
once the fault that parked them is fixed.

Without ``--yes`` it only lists the open dead letters the filters select (a dry run);
with ``--yes`` it requeues them (``ingest.services.requeue_dead_letters``): each event is
un-parked and sent to the enrich stage again, each parked stream's advance resumes from
where it stopped, each alert item is evaluated again; every dead letter is marked
requeued (``requeued_at``, ``requeues``) and kept as the audit trail. An item that fails
again is parked again after ``DEAD_LETTER_MAX_ATTEMPTS`` new attempts.

Filters (combined with AND): ``--stage``, ``--source`` (id), ``--reason`` (a substring
of the reason, any case), ``--ids`` (dead-letter ids, comma-separated).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import QuerySet

from ingest import services
from ingest.models import DeadLetter

LIST_LIMIT = 50


def _ids(value: str) -> list[int]:
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise CommandError(f"--ids takes comma-separated dead-letter ids, not {value!r}") from None


class Command(BaseCommand):
    help = "Re-drive parked dead letters (enrich, detect, alerts); a dry run without --yes."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--stage", choices=services.REQUEUE_STAGES)
        parser.add_argument("--source", type=int, help="a source id")
        parser.add_argument("--reason", help="a substring of the reason (any case)")
        parser.add_argument("--ids", type=_ids, help="dead-letter ids, comma-separated")
        parser.add_argument(
            "--yes", action="store_true", help="requeue them (without it: only list them)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        letters = self._select(options)
        count = letters.count()
        for letter in letters.order_by("id")[:LIST_LIMIT]:
            self.stdout.write(
                f"{letter.id}\t{letter.stage}\tsource {letter.source_id}\t"
                f"attempts {letter.attempts}\t{letter.reason[:120]}"
            )
        if count > LIST_LIMIT:
            self.stdout.write(f"... and {count - LIST_LIMIT} more")
        if not options["yes"]:
            self.stdout.write(f"{count} dead letters would be requeued (dry run: add --yes)")
            return
        requeued = services.requeue_dead_letters(letters)
        self.stdout.write(f"{len(requeued)} dead letters requeued")

    def _select(self, options: dict[str, Any]) -> QuerySet[DeadLetter]:
        letters = DeadLetter.objects.filter(
            stage__in=services.REQUEUE_STAGES, requeued_at__isnull=True
        ).exclude(payload__resend__isnull=True)
        if options["stage"]:
            letters = letters.filter(stage=options["stage"])
        if options["source"] is not None:
            letters = letters.filter(source_id=options["source"])
        if options["reason"]:
            letters = letters.filter(reason__icontains=options["reason"])
        if options["ids"] is not None:
            letters = letters.filter(id__in=options["ids"])
        return letters
