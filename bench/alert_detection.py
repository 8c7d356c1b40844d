"""Benchmark: alerts in a noisy stream, on the airline and TweetEval backgrounds.

Usage::

    make bench-alerts [BENCH_ARGS="--share 0.25 --skip-tweeteval"]
    python bench/alert_detection.py [--data ../shared/data] [--share 0.5]
                                    [--skip-tweeteval] [--json OUT] [--plot OUT.png]

Runs ``manage.py evaluate alerts`` (``mlengine.evaluation.alertbench``) with the public
CrisisLexT26 events (``<data>/crisislex_t26``) injected into two backgrounds:

- the airline archive (``<data>/airline_tweets/Tweets.csv``), replayed as it is;
- TweetEval's texts (``<data>/tweeteval``), first written as a timed archive by
  ``manage.py evaluate background`` (1,800 posts a day, the day/night cycle, seed 0)
  into a temporary folder that is removed afterwards.

Writes one JSON (default ``bench/results/alert_detection.json``): ``{"airline": …,
"tweeteval": …}``, each the command's result with ``run_s`` (wall seconds of the
evaluation) added; and a plot (default ``bench/results/alert_detection.png``): per
background, each event's span, burst, first naming alert, and the false alerts. Prints
each background's summary line. Needs the settings' environment (``make bench-alerts``
provides it); the evaluation itself reads no database.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twiscope.settings")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402

from mlengine.evaluation import alertbench  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def evaluate(background: Path, events: Path, share: float, out: Path) -> dict[str, Any]:
    """Run ``evaluate alerts`` into ``out``; return its result with ``run_s``."""
    started = time.perf_counter()
    call_command(
        "evaluate",
        "alerts",
        "--background",
        str(background),
        "--events",
        str(events),
        "--share",
        str(share),
        "--json",
        str(out),
    )
    result: dict[str, Any] = json.loads(out.read_text())
    result["run_s"] = round(time.perf_counter() - started, 1)
    return result


def plot(results: dict[str, dict[str, Any]], out: Path) -> None:
    """One timeline per background: event spans (bands), bursts (lines), first naming
    alerts (green dots, with the delay), false alerts (red ticks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(15, 3.6 * len(results)), squeeze=False)
    for ax, (name, result) in zip(axes[:, 0], results.items(), strict=True):
        start = datetime.fromisoformat(result["background"]["start"])

        def days(iso: str, start: datetime = start) -> float:
            return (datetime.fromisoformat(iso) - start).total_seconds() / 86400

        for row, event in enumerate(result["events"]):
            lo, hi = (days(t) for t in event["span"])
            ax.axvspan(lo, hi, color="tab:blue" if row % 2 else "tab:cyan", alpha=0.15)
            ax.text(lo, 1.02, event["name"][5:22], rotation=60, fontsize=6, va="bottom")
            if event["burst"]:
                ax.axvline(days(event["burst"]), color="tab:blue", lw=0.8)
            named = [a["named_at"] for a in event["fired"] if a["named_at"]]
            if named:
                at = days(min(named))
                ax.plot([at], [0.6], "o", color="tab:green")
                ax.annotate(f"{event['delay_from_burst_h']} h", (at, 0.62), fontsize=6)
            else:
                ax.plot([(lo + hi) / 2], [0.6], "x", color="grey")
        false = [days(a["at"]) for a in result["false_alerts"]]
        ax.plot(false, [0.3] * len(false), "|", color="tab:red", markersize=14)
        ax.set_ylim(0, 1)
        ax.set_yticks([0.3, 0.6], ["false alerts", "first naming alert"])
        ax.set_xlim(0, result["background_days"])
        ax.set_xlabel("days from the background's first post")
        ax.set_title(
            f"{name}: {result['detected']}/{len(result['events'])} detected, "
            f"{result['detected_within_1h']} within 1 h of the burst, "
            f"{result['false_alerts_per_day']} false alerts a day",
            pad=80,
            fontsize=10,
        )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--share", type=float, default=alertbench.DEFAULT_SHARE)
    parser.add_argument("--skip-tweeteval", action="store_true")
    parser.add_argument("--json", type=Path, default=RESULTS / "alert_detection.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "alert_detection.png")
    options = parser.parse_args()
    events = options.data / "crisislex_t26"
    options.json.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        airline = options.data / "airline_tweets" / "Tweets.csv"
        results["airline"] = evaluate(airline, events, options.share, scratch / "airline.json")
        if not options.skip_tweeteval:
            archive = scratch / "tweeteval.jsonl"
            call_command(
                "evaluate",
                "background",
                "--tweeteval",
                str(options.data / "tweeteval"),
                "--out",
                str(archive),
            )
            results["tweeteval"] = evaluate(
                archive, events, options.share, scratch / "tweeteval.json"
            )
            results["tweeteval"]["background"]["path"] = "(generated, seed 0, 1,800 a day)"
    options.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {options.json}")
    if options.plot:
        plot(results, options.plot)
        print(f"wrote {options.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
