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
(``mlengine.inference.virality_training``).

``manage.py evaluate alerts --background PATH --events DIR [--share S] [--json OUT]``:
CrisisLexT26-layout events injected into a replayable archive and replayed as one stream
through the trend detector and the default rule (``mlengine.evaluation.alertbench``).

``manage.py evaluate background --tweeteval DIR --out FILE [--per-day N] [--seed S]
[--start ISO]``: writes a replayable archive (X API v2 JSON lines) of TweetEval's texts
at event times drawn at a daily rate with a day/night cycle
(``mlengine.evaluation.background``), a background for ``evaluate alerts``."""

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
            help=(
                f"one of: {', '.join(sorted(heads.TASKS))}, trends, anomaly, virality, alerts, "
                "background"
            ),
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
            "--background",
            type=Path,
            default=None,
            help="alerts: the background archive (any format manage.py replay reads)",
        )
        parser.add_argument(
            "--events", type=Path, default=None, help="alerts: CrisisLexT26-layout event folders"
        )
        parser.add_argument(
            "--share",
            type=float,
            default=None,
            help="alerts: an event's busiest hour at most this share of the background's "
            "mean posts per hour (default 0.5)",
        )
        parser.add_argument(
            "--tweeteval", type=Path, default=None, help="background: TweetEval's folder"
        )
        parser.add_argument("--out", type=Path, default=None, help="background: write it here")
        parser.add_argument(
            "--per-day", type=float, default=None, help="background: mean posts a day (1800)"
        )
        parser.add_argument("--seed", type=int, default=None, help="background: seed (0)")
        parser.add_argument(
            "--start", default=None, help="background: first day, ISO 8601 (2015-02-17)"
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
        if options["task"] == "alerts":
            self._alerts(options)
            return
        if options["task"] == "background":
            self._background(options)
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
                f"{row['first_alert_delay_h']} h after onset, "
                f"{row['delay_from_burst_h']} h after the burst, keyword precision "
                f"{row['keyword_precision']}, peak lead {row['peak_lead_h']} h"
            )
        self.stdout.write(
            f"trends ({result['detector']}) on {len(result['events'])} CrisisLexT26 events: "
            f"median alerts {result['median_alerts']} (mean {result['alerts_per_event']}), "
            f"median first-alert delay {result['median_first_alert_delay_h']} h after onset, "
            f"{result['median_delay_from_burst_h']} h after the burst, median keyword "
            f"precision {result['median_keyword_precision']}"
        )
        self._write_json(options, result)

    def _alerts(self, options: dict[str, Any]) -> None:
        """``evaluate alerts --background PATH --events DIR [--share S] [--json OUT]``:
        events injected into a background, replayed as one stream through the trend
        detector and the default rule (``mlengine.evaluation.alertbench``)."""
        from mlengine.evaluation import alertbench, crisislex

        if options["background"] is None or options["events"] is None:
            raise CommandError(
                "evaluate alerts needs --background PATH (an archive manage.py replay reads) "
                "and --events DIR (CrisisLexT26-layout event folders)"
            )
        share = alertbench.DEFAULT_SHARE if options["share"] is None else options["share"]
        try:
            result = alertbench.run(options["background"], options["events"], share=share)
        except (alertbench.AlertBenchError, crisislex.CrisisLexError) as exc:
            raise CommandError(str(exc)) from exc
        for row in result["events"]:
            self.stdout.write(
                f"  {row['name']}: {'detected' if row['detected'] else 'missed'}, "
                f"{row['delay_from_burst_h']} h after the burst, {row['alerts']} alerts, "
                f"keyword precision {row['keyword_precision']} "
                f"({row['posts_injected']} posts injected, {row['kept']} of the sample kept)"
            )
        for alert in result["false_alerts"]:
            self.stdout.write(
                f"  false alert {alert['at']}: {', '.join(alert['terms'][:6])} ({alert['origin']})"
            )
        self.stdout.write(
            f"alerts on {result['background']['posts']} background posts "
            f"({result['background_days']} days, {result['bucket_s']} s buckets) with "
            f"{len(result['events'])} events: {result['detected']} detected, "
            f"{result['detected_within_1h']} within 1 h of the burst, median delay "
            f"{result['median_delay_from_burst_h']} h, median keyword precision "
            f"{result['median_keyword_precision']}, {result['false_alerts_per_day']} false "
            "alerts a day"
        )
        self._write_json(options, result)

    def _background(self, options: dict[str, Any]) -> None:
        """``evaluate background --tweeteval DIR --out FILE [--per-day N] [--seed S]
        [--start ISO]``: a timed archive of TweetEval's texts
        (``mlengine.evaluation.background``)."""
        from mlengine.evaluation import background

        if options["tweeteval"] is None or options["out"] is None:
            raise CommandError("evaluate background needs --tweeteval DIR and --out FILE")
        try:
            start = background.parse_start(options["start"] or background.DEFAULT_START)
            written = background.write_tweeteval(
                options["tweeteval"],
                options["out"],
                per_day=(
                    background.DEFAULT_PER_DAY if options["per_day"] is None else options["per_day"]
                ),
                seed=0 if options["seed"] is None else options["seed"],
                start=start,
            )
        except background.BackgroundError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"wrote {options['out']}: {written['posts']} posts from {written['first']} to "
            f"{written['last']} ({written['per_day']} a day)"
        )

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
