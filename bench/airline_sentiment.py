"""Sentiment in the airline archive's own domain: the active head against VADER.

Usage (with a trained sentiment head; ``make run`` up, or ``DATABASE_URL`` set)::

    python bench/airline_sentiment.py [--data ../shared/data] [--json OUT]

Reads ``airline_tweets/Tweets.csv`` and its human labels (``airline_sentiment``:
negative, neutral, positive), classifies every tweet with the active sentiment head
(``mlengine.facade.classify``) and with VADER's compound score (the pipeline's fast path;
negative below −0.05, positive above 0.05, neutral between: Hutto & Gilbert's
thresholds), and prints macro-averaged recall, accuracy and per-class recall of both on
the same rows. The heads are trained on TweetEval, never on this archive, so every row
is one the model did not train on.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twiscope.settings")

import django  # noqa: E402

django.setup()

from mlengine import facade  # noqa: E402
from mlengine.enrichment.text import _vader  # noqa: E402
from mlengine.inference.heads import metrics, task  # noqa: E402

LABELS = ("negative", "neutral", "positive")


def vader_label(compound: float) -> str:
    """VADER's label of a compound score (Hutto & Gilbert, ICWSM 2014: ±0.05)."""
    if compound <= -0.05:
        return "negative"
    if compound >= 0.05:
        return "positive"
    return "neutral"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--json", type=Path, default=None)
    options = parser.parse_args()
    with (options.data / "airline_tweets" / "Tweets.csv").open(encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("airline_sentiment") in LABELS]
    texts = [r["text"] for r in rows]
    truth = [LABELS.index(r["airline_sentiment"]) for r in rows]
    predictions = facade.classify("sentiment", texts)
    head_ids = [LABELS.index(p.label) for p in predictions]
    vader = _vader()
    vader_ids = [LABELS.index(vader_label(vader.polarity_scores(t)["compound"])) for t in texts]
    sentiment = task("sentiment")
    result = {
        "rows": len(rows),
        "model_version": predictions[0].model_version if predictions else None,
        "head": metrics(sentiment, truth, head_ids),
        "vader": metrics(sentiment, truth, vader_ids),
    }
    for name in ("head", "vader"):
        scores = result[name]
        recalls = ", ".join(f"{k} {v['recall']}" for k, v in scores["per_class"].items())
        print(
            f"{name:>5}: macro-recall {scores['macro_recall']}, accuracy "
            f"{scores['accuracy']} (recall: {recalls})"
        )
    if options.json:
        options.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
