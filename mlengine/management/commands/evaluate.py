"""``manage.py evaluate <task> --data DIR --split NAME [--json OUT]``: the task's
official metric for its active head on a TweetEval-layout split, with per-class figures
(macro-averaged recall for sentiment; macro-F1 for emotion and offensive)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from mlengine import heads, training


class Command(BaseCommand):
    help = "Evaluate the active head of a task on DIR/SPLIT_text.txt and DIR/SPLIT_labels.txt."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("task", help=f"one of: {', '.join(sorted(heads.TASKS))}")
        parser.add_argument("--data", type=Path, required=True)
        parser.add_argument("--split", required=True)
        parser.add_argument("--json", type=Path, default=None, help="write the result here")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            result = training.evaluate(options["task"], options["data"], options["split"])
        except (heads.UnknownTask, heads.DataError, training.NoTrainedModel) as exc:
            raise CommandError(str(exc)) from exc
        metric = heads.task(options["task"]).metric
        self.stdout.write(
            f"{result['task']} on {result['split']} ({result['n']} texts), "
            f"{result['model_version']}: {metric} {result[metric]}"
        )
        for line in heads.per_class_lines(result["per_class"]):
            self.stdout.write(line)
        if options["json"]:
            options["json"].write_text(json.dumps(result, indent=2) + "\n")
            self.stdout.write(f"wrote {options['json']}")
