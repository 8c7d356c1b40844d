"""Benchmark: language identification of the enrich stage against Lingua, on real archives.

Reads every post of the real archives (``--data``, ``../shared/data`` beside the repo):
the airline tweets, every CrisisLexT26 ``*-tweets_labeled.csv``, the Trump tweets and the
Telegram channels, with the replay's own parsers (``ingest.sources.replay.formats``), and
takes each text as ``mlengine.enrichment.text.enrich_text`` gives it to ``detect_language`` (URLs,
cashtags, hashtags and mentions replaced by spaces). It reports:

- agreement with the reference, Lingua's high-accuracy mode over
  ``settings.ENRICH_LANGUAGES``, per archive and overall, over all posts and over the
  posts with at least 3 letters (the others are "und" for every method), of
  ``mlengine.enrichment.text.detect_language`` (fastText ``lid.176.ftz``, Lingua high accuracy when
  fastText is unsure) and of the Lingua hybrid it replaced (high accuracy below 60
  letters, low accuracy above);
- the fallback threshold sweep: for each fastText probability threshold, the agreement
  and the share of posts handed to Lingua (so the threshold is chosen by measurement);
- cost per post (CPU µs, one core): Lingua high, the Lingua hybrid, the new path at each
  threshold of the sweep, on an evenly spaced sample of all archives; median of
  ``--runs`` runs in this process, the methods interleaved within each run;
- the rest of the enrich stage on the airline archive (µs per post, median of ``--runs``):
  VADER stock and ``mlengine.enrichment.text._Vader``, entities, the plain text, keywords, and the
  whole ``enrich_text`` before (the Lingua hybrid, stock VADER and the look-behind-first
  entity patterns swapped back in: ``old_parts``) and after;
- checks that the faster parts changed nothing: VADER's scores (all four) and the
  entities and plain text, old against new, on every post of every archive.

Settings come from ``twiscope.settings_test`` unless ``DJANGO_SETTINGS_MODULE`` says
otherwise (only ``ENRICH_LANGUAGES`` is read; no database is touched).

Usage: ``.venv/bin/python bench/langid_agreement.py [--data DIR] [--runs 5]
[--json bench/results/langid_agreement.json] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twiscope.settings_test")

from django.conf import settings  # noqa: E402
from lingua import IsoCode639_1, LanguageDetector, LanguageDetectorBuilder  # noqa: E402
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # noqa: E402

from ingest.sources.replay.formats import read_archive  # noqa: E402
from mlengine.enrichment import text as textmod  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
HYBRID_HIGH_BELOW_LETTERS = 60
"""The Lingua hybrid replaced: high-accuracy mode below this many letters, low above."""
OLD_PATTERNS = {
    "HASHTAG_RE": re.compile(r"(?<![\w&#])[#\uff03](\w*[^\W\d_]\w*)"),
    "MENTION_RE": re.compile(r"(?<![\w@\uff20])[@\uff20](\w{1,15})(?!\w)"),
    "CASHTAG_RE": re.compile(r"(?<![\w$])\$([A-Za-z]{1,6}(?:[._][A-Za-z]{1,2})?)(?![\w$])"),
}
"""The entity patterns before they were reordered (look-behind first): the same matches."""


def archives(data: Path) -> dict[str, list[Path]]:
    """The archive files by archive name.

    Raises:
        FileNotFoundError: an archive has no file under ``data``.
    """
    found = {
        "airline": [data / "airline_tweets" / "Tweets.csv"],
        "crisislex_t26": sorted(data.glob("crisislex_t26/*/*-tweets_labeled.csv")),
        "trump": [data / "trump_tweets" / "trump_tweets_2009_2016.csv"],
        "telegram": sorted(data.glob("telegram_news/*_messages.json")),
    }
    for name, paths in found.items():
        if not paths or not all(path.is_file() for path in paths):
            raise FileNotFoundError(f"archive {name!r} not found under {data}")
    return found


def read_texts(paths: Iterable[Path]) -> list[str]:
    """The text of every post the replay's parser accepts, in file order."""
    return [
        item.text
        for path in paths
        for item in read_archive(path)
        if isinstance(getattr(item, "text", None), str)
    ]


def plain_text(text: str) -> str:
    """``text`` as ``enrich_text`` passes it to ``detect_language``."""
    bare = textmod._entities(text)[4]
    return textmod.MENTION_RE.sub(
        " ", textmod.HASHTAG_RE.sub(" ", textmod.CASHTAG_RE.sub(" ", bare))
    )


def letters(text: str) -> int:
    return sum(ch.isalpha() for ch in text)


def lingua_detector(*, high_accuracy: bool) -> LanguageDetector:
    codes = [getattr(IsoCode639_1, code.upper()) for code in settings.ENRICH_LANGUAGES]
    builder = LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
    if not high_accuracy:
        builder = builder.with_low_accuracy_mode()
    return builder.with_preloaded_language_models().build()


def lingua_code(detector: LanguageDetector, text: str) -> str:
    """Lingua's answer as ``detect_language`` gives it: "und" under 3 letters or none."""
    if letters(text) < textmod.MIN_LETTERS:
        return "und"
    language = detector.detect_language_of(text)
    return "und" if language is None else language.iso_code_639_1.name.lower()


def make_hybrid(high: LanguageDetector, low: LanguageDetector) -> Callable[[str], str]:
    """The detector the enrich stage used before fastText (``mlengine/enrichment/text.py``
    history)."""

    def hybrid(text: str) -> str:
        count = letters(text)
        if count < textmod.MIN_LETTERS:
            return "und"
        detector = high if count < HYBRID_HIGH_BELOW_LETTERS else low
        language = detector.detect_language_of(text)
        return "und" if language is None else language.iso_code_639_1.name.lower()

    return hybrid


def with_threshold(threshold: float) -> Callable[[str], str]:
    """``detect_language`` with ``FASTTEXT_MIN_PROBABILITY`` set to ``threshold``."""

    def detect(text: str) -> str:
        saved = textmod.FASTTEXT_MIN_PROBABILITY
        textmod.FASTTEXT_MIN_PROBABILITY = threshold
        try:
            return textmod.detect_language(text)
        finally:
            textmod.FASTTEXT_MIN_PROBABILITY = saved

    return detect


class CountingLingua:
    """A Lingua detector that counts its calls (how often fastText was unsure)."""

    def __init__(self, detector: LanguageDetector) -> None:
        self.detector = detector
        self.calls = 0

    def detect_language_of(self, text: str) -> Any:
        self.calls += 1
        return self.detector.detect_language_of(text)


def sweep(texts: dict[str, list[str]], reference: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Agreement with ``reference`` and share of posts handed to Lingua of
    ``detect_language`` at each of ``THRESHOLDS`` (0: fastText alone), on every post."""
    total = sum(len(items) for items in texts.values())
    counting = CountingLingua(textmod._lingua())
    saved = textmod._lingua
    textmod._lingua = lambda: counting
    rows = []
    try:
        for threshold in THRESHOLDS:
            counting.calls = 0
            detect = with_threshold(threshold)
            answers = {name: [detect(t) for t in items] for name, items in texts.items()}
            result = agreement(answers, reference, texts)
            rows.append(
                {
                    "threshold": threshold,
                    "agreement": result["overall"],
                    "agreement_decidable": result["overall_decidable"],
                    "lingua_share": counting.calls / total,
                    "per_archive": result["per_archive"],
                }
            )
    finally:
        textmod._lingua = saved
    return rows


def agreement(
    answers: dict[str, list[str]], reference: dict[str, list[str]], texts: dict[str, list[str]]
) -> dict[str, Any]:
    """Share of posts where ``answers`` equals ``reference``: per archive and overall, over
    all posts and over the posts with at least 3 letters; plus the commonest mismatches."""
    out: dict[str, Any] = {"per_archive": {}, "per_archive_decidable": {}}
    agree = total = agree_dec = total_dec = 0
    mismatches: Counter[tuple[str, str]] = Counter()
    for name, ref in reference.items():
        got = answers[name]
        decidable = [letters(t) >= textmod.MIN_LETTERS for t in texts[name]]
        hits = [a == r for a, r in zip(got, ref, strict=True)]
        n_dec = sum(decidable)
        hits_dec = sum(h for h, d in zip(hits, decidable, strict=True) if d)
        out["per_archive"][name] = sum(hits) / len(hits)
        out["per_archive_decidable"][name] = hits_dec / n_dec
        agree += sum(hits)
        total += len(hits)
        agree_dec += hits_dec
        total_dec += n_dec
        mismatches.update((r, a) for a, r in zip(got, ref, strict=True) if a != r)
    out["overall"] = agree / total
    out["overall_decidable"] = agree_dec / total_dec
    out["posts"] = total
    out["posts_decidable"] = total_dec
    out["top_mismatches"] = [
        {"lingua_high": r, "got": a, "count": c} for (r, a), c in mismatches.most_common(10)
    ]
    return out


def time_per_item(
    methods: dict[str, Callable[[str], Any]], items: Sequence[str], runs: int
) -> dict[str, float]:
    """Median over ``runs`` of each method's mean CPU µs per item (this process's CPU
    time, ``time.process_time``: what the enrich pool pays, and less disturbed than wall
    time by other work on the machine); the order of the methods rotates from run to run
    so that drift of the machine is shared."""
    samples: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for run in range(runs):
        for name in names[run % len(names) :] + names[: run % len(names)]:
            method = methods[name]
            start = time.process_time()
            for item in items:
                method(item)
            samples[name].append((time.process_time() - start) / len(items) * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


@contextmanager
def old_parts(hybrid: Callable[[str], str], stock: SentimentIntensityAnalyzer) -> Iterator[None]:
    """``mlengine.enrichment.text`` as it was before fastText: the Lingua hybrid, stock VADER
    and the look-behind-first entity patterns, swapped in for the block."""
    names = ["detect_language", "_vader", *OLD_PATTERNS]
    saved = {name: getattr(textmod, name) for name in names}
    textmod.detect_language = hybrid
    textmod._vader = lambda: stock
    for name, pattern in OLD_PATTERNS.items():
        setattr(textmod, name, pattern)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(textmod, name, value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--runs", type=int, default=5, help="timing runs (median)")
    parser.add_argument(
        "--timing-sample",
        type=int,
        default=5000,
        help="posts, evenly spaced over all archives, that the language timings use",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print a cProfile of enrich_text on airline"
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    raw = {name: read_texts(paths) for name, paths in archives(args.data).items()}
    texts = {name: [plain_text(t) for t in items] for name, items in raw.items()}
    print("posts:", {name: len(items) for name, items in texts.items()}, flush=True)

    load = time.perf_counter()
    textmod.warm_up()
    warm_up_s = time.perf_counter() - load
    high = lingua_detector(high_accuracy=True)
    low = lingua_detector(high_accuracy=False)
    hybrid = make_hybrid(high, low)

    reference = {n: [lingua_code(high, t) for t in items] for n, items in texts.items()}
    new = {n: [textmod.detect_language(t) for t in items] for n, items in texts.items()}
    old = {n: [hybrid(t) for t in items] for n, items in texts.items()}
    results: dict[str, Any] = {
        "languages": list(settings.ENRICH_LANGUAGES),
        "threshold": textmod.FASTTEXT_MIN_PROBABILITY,
        "warm_up_s": warm_up_s,
        "agreement_with_lingua_high": {
            "fasttext_with_lingua_fallback": agreement(new, reference, texts),
            "lingua_hybrid": agreement(old, reference, texts),
        },
    }
    print("agreement done", round(time.perf_counter() - started), "s", flush=True)

    all_texts = [t for items in texts.values() for t in items]
    step = max(1, len(all_texts) // args.timing_sample)
    sample = all_texts[::step]
    sweep_rows = sweep(texts, reference)
    methods: dict[str, Callable[[str], Any]] = {
        "lingua_high": lambda t: lingua_code(high, t),
        "lingua_hybrid": hybrid,
    }
    for row in sweep_rows:
        methods[f"fasttext@{row['threshold']}"] = with_threshold(row["threshold"])
    cost = time_per_item(methods, sample, args.runs)
    for row in sweep_rows:
        row["us_per_post"] = cost[f"fasttext@{row['threshold']}"]
    results["threshold_sweep"] = sweep_rows
    results["language_us_per_post"] = {
        "lingua_high": cost["lingua_high"],
        "lingua_hybrid": cost["lingua_hybrid"],
        "new": cost[f"fasttext@{textmod.FASTTEXT_MIN_PROBABILITY}"],
        "sample_posts": len(sample),
    }
    print("language timings done", round(time.perf_counter() - started), "s", flush=True)

    stock = SentimentIntensityAnalyzer()
    fast = textmod._vader()
    every = [t for items in raw.values() for t in items]
    differ = sum(stock.polarity_scores(t) != fast.polarity_scores(t) for t in every)
    airline = raw["airline"]
    airline_plain = texts["airline"]
    langs = [textmod.detect_language(t) for t in airline_plain]

    def keywords(pair: tuple[str, str]) -> object:
        plain, lang = pair
        stop = textmod.stop_words_for(lang)
        return [w for w in (m.lower() for m in textmod.WORD_RE.findall(plain)) if w not in stop]

    def enrich_before(text: str) -> object:
        with old_parts(hybrid, stock):
            return textmod.enrich_text(text)

    def old_entities(text: str) -> object:
        with old_parts(hybrid, stock):
            return textmod._entities(text), plain_text(text)

    entities_differ = sum(old_entities(t) != (textmod._entities(t), plain_text(t)) for t in every)

    parts = time_per_item(
        {
            "vader_stock": stock.polarity_scores,
            "vader_fast": fast.polarity_scores,
            "entities": textmod.extract_entities,
            "plain_text": plain_text,
            "enrich_before": enrich_before,
            "enrich_after": textmod.enrich_text,
        },
        airline,
        args.runs,
    )
    # detect_language takes the plain text (as enrich_text gives it), not the raw one.
    parts.update(
        time_per_item(
            {"language_new": textmod.detect_language, "language_hybrid": hybrid},
            airline_plain,
            args.runs,
        )
    )
    parts["keywords"] = time_per_item(
        {"keywords": keywords}, list(zip(airline_plain, langs, strict=True)), args.runs
    )["keywords"]
    results["vader_identical"] = {"posts": len(every), "differ": differ}
    results["entities_identical"] = {"posts": len(every), "differ": entities_differ}
    results["airline_enrich_us_per_post"] = parts
    results["runs"] = args.runs
    results["python"] = platform.python_version()
    results["machine"] = platform.machine()
    results["elapsed_s"] = time.perf_counter() - started

    print(json.dumps(results, indent=2, ensure_ascii=False))
    if args.profile:
        for label, enrich in (("before", enrich_before), ("after", textmod.enrich_text)):
            print(f"--- cProfile of enrich_text {label}, airline archive")
            profile = cProfile.Profile()
            profile.enable()
            for text in airline:
                enrich(text)
            profile.disable()
            pstats.Stats(profile).sort_stats("cumulative").print_stats(20)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
