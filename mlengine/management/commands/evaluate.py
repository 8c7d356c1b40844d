"""``manage.py evaluate <task> --data DIR --split NAME [--json OUT]``: the task's
official metric for its active head on a TweetEval-layout split, with per-class figures
(macro-averaged recall for sentiment; macro-F1 for emotion and offensive).

``manage.py evaluate anomaly --nab DIR [--detections OUTDIR] [--json OUT]``: the anomaly
detector on every category folder of NAB's ``DIR`` (``DIR/<category>/*.csv``), scored with
NAB's three profiles per file, per category and over the corpus, printed beside NAB's
published whole-corpus scoreboard (``mlengine.evaluation.nab_harness``).
``manage.py evaluate anomaly --nab DIR --search [--json OUT]``: choose the harness's knobs
on that corpus (a small grid), with the leave-one-out check on its realTweets files.

``manage.py evaluate virality --data CSV [--since DATE] [--json OUT]``: ROC-AUC of the
active virality model on a trump_tweets-layout CSV's posts from DATE on
(``mlengine.inference.virality_training``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from mlengine.inference import heads, training


class Command(BaseCommand):
    help = "Evaluate the active head of a task on DIR/SPLIT_text.txt and DIR/SPLIT_labels.txt."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "task",
            help=f"one of: {', '.join(sorted(heads.TASKS))}, trends, anomaly, virality",
        )
        parser.add_argument("--data", type=Path, default=None)
        parser.add_argument("--split", default=None)
        parser.add_argument("--nab", type=Path, default=None, help="anomaly: NAB folder")
        parser.add_argument(
            "--detections", type=Path, default=None, help="anomaly: write NAB result files here"
        )
        parser.add_argument(
            "--crisislex", type=Path, default=None, help="trends: CrisisLexT26 event folders"
        )
        parser.add_argument(
            "--detector",
            choices=("stories", "terms"),
            default="stories",
            help="trends: the story layer (default) or the term-level detector before it",
        )
        parser.add_argument(
            "--since",
            default=None,
            help="virality: score only posts at or after DATE (earlier rows are history)",
        )
        parser.add_argument(
            "--search",
            action="store_true",
            help="anomaly: choose the detector's knobs on the NAB corpus (grid, leave-one-out)",
        )
        parser.add_argument("--json", type=Path, default=None, help="write the result here")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["task"] == "trends":
            self._trends(options)
            return
        if options["task"] == "anomaly":
            self._anomaly(options)
            return
        if options["task"] == "virality":
            self._virality(options)
            return
        if options["data"] is None or options["split"] is None:
            raise CommandError("--data and --split are required for this task")
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
        self._write_json(options, result)

    def _anomaly(self, options: dict[str, Any]) -> None:
        """``evaluate anomaly --nab DIR [--detections OUTDIR] [--search] [--json OUT]``:
        NAB scores of the anomaly detector's own decisions on every category of ``DIR``,
        or (``--search``) the choice of its knobs on them."""
        from mlengine.evaluation import nab, nab_harness

        if options["nab"] is None:
            raise CommandError("evaluate anomaly needs --nab DIR (a NAB folder)")
        if options["search"]:
            self._anomaly_search(options)
            return
        try:
            result = nab_harness.run(options["nab"], options["detections"])
        except nab.NabDataError as exc:
            raise CommandError(str(exc)) from exc
        profiles = nab_harness.PROFILES

        def figures(row: dict[str, Any]) -> str:
            return " / ".join("—" if row[p] is None else f"{row[p]:.1f}" for p in profiles)

        self.stdout.write(
            f"anomaly ({result['detector']}) on {result['files']} NAB files: "
            + ", ".join(f"{p} {result[p]:.2f}" for p in profiles)
        )
        for name, row in result["per_file"].items():
            self.stdout.write(
                f"  {name}: standard {row['standard']:.2f}, "
                f"{row['detected']}/{row['windows']} windows, {row['false_positives']} FP"
            )
        self.stdout.write("per category (standard / reward_low_FP_rate / reward_low_FN_rate):")
        for name, row in result["per_category"].items():
            self.stdout.write(
                f"  {name}: {figures(row)} ({row['files']} files, {row['detected']}/"
                f"{row['windows']} windows, {row['false_positives']} FP, raw standard "
                f"{row['raw']['standard']:.2f})"
            )
        self.stdout.write(f"  all {result['files']} files: {figures(result)}")
        if result["production_realTweets"] is not None:
            self.stdout.write(
                "  realTweets at production's operating point (Params(): threshold 5.5, "
                f"rises only): {figures(result['production_realTweets'])}"
            )
        self.stdout.write(
            "NAB's published scoreboard, whole corpus of 58 files (NAB README; "
            "published per-category figures are not in the data folder):"
        )
        for name, scores in result["scoreboard"].items():
            self.stdout.write(f"  {name}: {figures(scores)}")
        self._write_json(options, result)

    def _anomaly_search(self, options: dict[str, Any]) -> None:
        """``evaluate anomaly --nab DIR --search [--json OUT]``: the knobs chosen on the
        corpus, its scores, and the leave-one-out realTweets scores."""
        from mlengine.evaluation import nab, nab_harness

        try:
            result = nab_harness.search(options["nab"], progress=self.stderr.write)
        except nab.NabDataError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"chosen: {result['chosen']} (mean standard of its grid neighbourhood "
            f"{result['chosen_standard_at_neighbours']:.2f}; the best single setting "
            f"{result['top'][0]['standard']:.2f}: {result['top'][0]['knobs']})"
        )
        self.stdout.write(
            "whole corpus: "
            + ", ".join(f"{p} {result['corpus'][p]:.2f}" for p in nab_harness.PROFILES)
        )
        for name, row in result["per_category"].items():
            self.stdout.write(f"  {name}: standard {row['standard']}")
        self.stdout.write(f"realTweets in sample: {result['realTweets_in_sample']:.2f}")
        for name, fold in result["leave_one_out"].items():
            self.stdout.write(
                f"  {name} held out: {fold['held_out']:.2f} (in sample {fold['in_sample']:.2f}, "
                f"the rest {fold['others']:.2f}) with {fold['knobs']}"
            )
        self.stdout.write(
            f"leave-one-out realTweets: mean {result['leave_one_out_mean']:.2f}, pooled "
            f"{result['leave_one_out_pooled']:.2f}"
        )
        self._write_json(options, result)

    def _trends(self, options: dict[str, Any]) -> None:
        """``evaluate trends --crisislex DIR [--detector stories|terms] [--json OUT]``: the
        trend detector replayed on each CrisisLexT26 event (``mlengine.evaluation.crisislex``)."""
        from mlengine.evaluation import crisislex

        if options["crisislex"] is None:
            raise CommandError("evaluate trends needs --crisislex DIR (CrisisLexT26 events)")
        try:
            result = crisislex.evaluate(options["crisislex"], detector=options["detector"])
        except crisislex.CrisisLexError as exc:
            raise CommandError(str(exc)) from exc
        for row in result["events"]:
            self.stdout.write(
                f"  {row['name']}: {row['alerts']} alerts, first keyword alert "
                f"{row['first_alert_delay_h']} h after onset, keyword precision "
                f"{row['keyword_precision']}, peak lead {row['peak_lead_h']} h"
            )
        self.stdout.write(
            f"trends ({result['detector']}) on {len(result['events'])} CrisisLexT26 events: "
            f"median alerts {result['median_alerts']}, median first-alert delay "
            f"{result['median_first_alert_delay_h']} h"
        )
        self._write_json(options, result)

    def _virality(self, options: dict[str, Any]) -> None:
        """``evaluate virality --data CSV [--since DATE] [--json OUT]``: ROC-AUC of the
        active virality model (``mlengine.inference.virality_training``)."""
        from tqdm import tqdm

        from mlengine.inference import virality_features, virality_training

        if options["data"] is None:
            raise CommandError("evaluate virality needs --data CSV (trump_tweets layout)")
        try:
            since = virality_features.parse_date(options["since"]) if options["since"] else None
        except ValueError as exc:
            raise CommandError(f"--since: {exc}") from exc
        bar = tqdm(desc="embedding", unit="text", file=self.stderr, disable=None, leave=False)
        try:
            result = virality_training.evaluate(
                options["data"], since=since, embed_progress=bar.update
            )
        except (virality_features.DataError, training.NoTrainedModel) as exc:
            raise CommandError(str(exc)) from exc
        finally:
            bar.close()
        self.stdout.write(
            f"virality on {result['data']} since {result['since'] or 'the start'} "
            f"({result['n']} posts, {result['positives']} viral), {result['model_version']}: "
            f"roc_auc {result['roc_auc']}"
        )
        for point in result["operating_points"]:
            precision = point["precision"]
            self.stdout.write(
                f"  min_score {point['min_score']}: {point['alerts']} alerts "
                f"({point['alerts_per_1000']} per 1,000 posts), precision "
                f"{'—' if precision is None else precision}, recall {point['recall']}"
            )
        keys = ("roc_auc", "n", "positives", "operating_points", "model_version")
        self._write_json(options, {k: result[k] for k in keys})

    def _write_json(self, options: dict[str, Any], result: dict[str, Any]) -> None:
        """Write ``result`` to ``--json OUT``, when given."""
        if options["json"]:
            options["json"].write_text(json.dumps(result, indent=2) + "\n")
            self.stdout.write(f"wrote {options['json']}")
