"""``manage.py train <task> --data DIR [--splits a,b] [--eval-split NAME] [--epochs N]``:
train a classifier head on the sentence encoder and register it
(``mlengine.inference.training``).

``manage.py train virality --data CSV [--until DATE]``: the virality model on a
trump_tweets-layout CSV's posts before DATE
(``mlengine.inference.virality_training``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from mlengine.inference import heads, training


class Command(BaseCommand):
    help = (
        "Train a classifier head (sentiment, emotion, offensive) on TweetEval-layout data; "
        "it becomes active only if it beats the active one on the evaluation split."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("task", help=f"one of: {', '.join(sorted(heads.TASKS))}")
        parser.add_argument(
            "--data",
            type=Path,
            required=True,
            help="folder of SPLIT_text.txt/SPLIT_labels.txt (virality: a trump_tweets CSV)",
        )
        parser.add_argument(
            "--until", default=None, help="virality: train on posts before DATE only"
        )
        parser.add_argument(
            "--splits",
            default=None,
            help="comma-separated training splits (default: 'train', else 'val'; "
            "never a split starting with 'test' unless named)",
        )
        parser.add_argument(
            "--eval-split",
            default=None,
            help="split to evaluate on and to compare with the active model (default: 'val' "
            "when training on 'train', else 20%% held out of the training texts)",
        )
        parser.add_argument(
            "--method",
            choices=training.METHODS,
            default="auto",
            help="frozen: logistic regression on the frozen sentence vectors; finetune: the "
            "encoder fine-tuned with the head; auto (default): both when there are at most "
            f"{training.FINETUNE_MAX_TEXTS} training texts, keeping the better",
        )
        parser.add_argument(
            "--epochs",
            type=int,
            default=3,
            help="fine-tuning epochs (passes over the training texts; default 3)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        data: Path = options["data"]
        if options["task"] == "virality":
            self._virality(data, options["until"])
            return
        if not data.is_dir():
            raise CommandError(f"no such folder: {data}")
        if options["epochs"] < 1:
            raise CommandError("--epochs must be at least 1")
        splits = [s.strip() for s in options["splits"].split(",")] if options["splits"] else None
        bar = tqdm(desc="embedding", unit="text", file=self.stderr, disable=None, leave=False)
        steps = tqdm(desc="fine-tuning", unit="text", file=self.stderr, disable=None, leave=False)
        try:
            outcome = training.train(
                options["task"],
                data,
                splits=splits,
                eval_split=options["eval_split"],
                method=options["method"],
                epochs=options["epochs"],
                embed_progress=bar.update,
                train_progress=steps.update,
                note=lambda text: self.stderr.write(f"  {text}"),
            )
        except ValueError as exc:  # UnknownTask, DataError, or data a model cannot learn from
            raise CommandError(str(exc)) from exc
        finally:
            bar.close()
            steps.close()
        version = outcome.version
        metric = version.metrics["metric"]
        trained = ", ".join(f"{k} ({n})" for k, n in version.trained_on["splits"].items())
        compared = ", ".join(f"{m} {score}" for m, score in outcome.method_scores.items())
        self.stdout.write(
            f"{version.name} v{version.version} ({version.trained_on['method']}; measured: "
            f"{compared}): trained on {trained}; {metric} "
            f"{version.metrics[metric]} on {version.metrics['eval_split']} "
            f"({version.metrics['eval_n']} texts)"
        )
        for line in heads.per_class_lines(version.metrics["per_class"]):
            self.stdout.write(line)
        if outcome.previous_score is None:
            self.stdout.write("active: it is the first model of this task")
        elif outcome.promoted:
            self.stdout.write(f"active: it beats the previous active ({outcome.previous_score})")
        else:
            self.stdout.write(
                f"not active: the active model scores {outcome.previous_score} on the same texts"
            )

    def _virality(self, data: Path, until_text: str | None) -> None:
        """``train virality --data CSV [--until DATE]``
        (``mlengine.inference.virality_training``)."""
        from mlengine.inference import virality_features, virality_training

        try:
            until = virality_features.parse_date(until_text) if until_text else None
        except ValueError as exc:
            raise CommandError(f"--until: {exc}") from exc
        bar = tqdm(desc="embedding", unit="text", file=self.stderr, disable=None, leave=False)
        try:
            outcome = virality_training.train(data, until=until, embed_progress=bar.update)
        except virality_features.DataError as exc:
            raise CommandError(str(exc)) from exc
        finally:
            bar.close()
        version, metrics = outcome.version, outcome.version.metrics
        self.stdout.write(
            f"{version.name} v{version.version}: trained on {version.trained_on['n']} posts "
            f"({version.trained_on['positives']} viral) until {until_text or 'the end'}; "
            f"roc_auc {metrics['roc_auc']} on the {metrics['eval_split']} "
            f"({metrics['eval_n']} posts)"
        )
        if outcome.previous_score is None:
            self.stdout.write("active: it is the first model of this task")
        elif outcome.promoted:
            self.stdout.write(f"active: it beats the previous active ({outcome.previous_score})")
        else:
            self.stdout.write(
                f"not active: the active model scores {outcome.previous_score} on the same posts"
            )
