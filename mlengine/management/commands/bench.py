"""``manage.py bench encoder``: texts per second of the encoder, reference against
production, on real tweets. ``manage.py bench trends``: the trend detector's scoring
cost per batch of term windows (``score_terms``, vectorised, against ``score_term``
window by window, in the same run).

It reads up to ``--texts`` real posts (the airline archive, TweetEval's sentiment texts
and CrisisLexT26, from ``--data``), embeds them with the reference (plain transformers,
fp32 on the CPU, in input order) and with the production path (``Encoder.embed``) at
batch sizes 1, 8, 32 and 128, ``--runs`` times each, and prints the median texts/s, the
ratio of production to the reference at batch 32 (the reference's own setting), and
the cosine of each production vector to its reference vector (min and mean). On a
machine with CUDA it also measures the production path on the GPU in fp16 and fp32.
``--json OUT`` writes the same figures.
"""

from __future__ import annotations

import csv
import functools
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from django.core.management.base import BaseCommand, CommandError, CommandParser

from mlengine.inference import encoder

BATCH_SIZES = (1, 8, 32, 128)
DEFAULT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"


def real_texts(data: Path, limit: int) -> list[str]:
    """Up to ``limit`` distinct non-empty posts from the archives under ``data``, taken
    in turn from each (airline, TweetEval sentiment, CrisisLexT26) so all three kinds
    are represented.

    Raises:
        CommandError: none of the archives is there.
    """
    sources: list[list[str]] = []
    airline = data / "airline_tweets" / "Tweets.csv"
    if airline.is_file():
        with airline.open(encoding="utf-8", errors="replace", newline="") as fh:
            sources.append([row.get("text", "") for row in csv.DictReader(fh)])
    tweeteval = data / "tweeteval" / "sentiment" / "test_public_text.txt"
    if tweeteval.is_file():
        sources.append(tweeteval.read_text(encoding="utf-8", errors="replace").splitlines())
    crisis: list[str] = []
    for path in sorted((data / "crisislex_t26").glob("*/*-tweets_labeled.csv")):
        with path.open(encoding="utf-8", errors="replace", newline="") as fh:
            for row in csv.DictReader(fh, skipinitialspace=True):
                crisis.append(row.get("Tweet Text") or "")
    if crisis:
        sources.append(crisis)
    if not sources:
        raise CommandError(f"no real tweets under {data}: pass --data with the shared data sets")
    texts: dict[str, None] = {}
    for round_ in range(max(len(s) for s in sources)):
        for source in sources:
            if round_ < len(source) and source[round_].strip():
                texts.setdefault(source[round_].strip(), None)
            if len(texts) >= limit:
                return list(texts)
    return list(texts)


def _rate(fn: Callable[[Sequence[str]], np.ndarray], texts: list[str], runs: int) -> float:
    """Median texts/s of ``fn(texts)`` over ``runs`` runs, after one untimed pass over
    the same texts: the steady state of a long-running worker, whose CPU kernels have
    met its input shapes."""
    fn(texts)
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        fn(texts)
        rates.append(len(texts) / (time.perf_counter() - started))
    return round(statistics.median(rates), 1)


class Command(BaseCommand):
    help = (
        "Benchmark a model: 'encoder' (texts/s, reference against production) or 'trends' "
        "(the trend detector's scoring cost per window)."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("what", choices=["encoder", "trends"])
        parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
        parser.add_argument("--texts", type=int, default=512, help="how many real texts")
        parser.add_argument("--runs", type=int, default=3, help="runs per setting (median)")
        parser.add_argument(
            "--batch-sizes",
            default=",".join(map(str, BATCH_SIZES)),
            help="comma-separated batch sizes (default 1,8,32,128)",
        )
        parser.add_argument("--json", type=Path, default=None, help="write the figures here")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["what"] == "trends":
            self._trends(options)
            return
        try:
            sizes = [int(s) for s in options["batch_sizes"].split(",") if s.strip()]
        except ValueError as exc:
            raise CommandError(f"--batch-sizes: {exc}") from exc
        if not sizes or min(sizes) < 1 or options["texts"] < 1 or options["runs"] < 1:
            raise CommandError("--texts, --runs and every batch size must be at least 1")
        texts = real_texts(options["data"], options["texts"])
        runs = options["runs"]
        cpu = encoder.Encoder(device="cpu")
        result: dict[str, Any] = {
            "texts": len(texts),
            "runs": runs,
            "cpu": {"device_name": cpu.info().device_name, "dtype": cpu.dtype},
            "reference": {},
            "production": {},
        }
        reference_vectors = encoder.reference_embed(texts)
        for size in sizes:
            result["reference"][str(size)] = _rate(
                functools.partial(encoder.reference_embed, batch_size=size), texts, runs
            )
            cpu.batch_size = size
            result["production"][str(size)] = _rate(cpu.embed, texts, runs)
            self.stdout.write(
                f"batch {size:>4}: reference {result['reference'][str(size)]:>7} texts/s, "
                f"production ({cpu.dtype}) {result['production'][str(size)]:>7} texts/s"
            )
        cpu.batch_size = 32
        cosine = (cpu.embed(texts) * reference_vectors).sum(axis=1)
        result["cosine_to_reference"] = {
            "min": round(float(cosine.min()), 5),
            "mean": round(float(cosine.mean()), 5),
        }
        base = result["reference"].get("32") or max(result["reference"].values())
        best = max(result["production"].values())
        result["ratio_to_reference_at_32"] = round(best / base, 2)
        self.stdout.write(
            f"production best {best} texts/s = {result['ratio_to_reference_at_32']}x the "
            f"reference at batch 32 ({base}); cosine to the reference min "
            f"{result['cosine_to_reference']['min']}, mean {result['cosine_to_reference']['mean']}"
        )
        if encoder.pick_device() == "cuda":
            result["cuda"] = self._cuda(texts, sizes, runs, reference_vectors)
        if options["json"]:
            options["json"].write_text(json.dumps(result, indent=2) + "\n")
            self.stdout.write(f"wrote {options['json']}")

    def _trends(self, options: dict[str, Any]) -> None:
        """Scoring cost of ``n`` term windows (1,000 to 100,000): microseconds a window
        for ``score_terms`` (one call) and for ``score_term`` (a Python loop, the way the
        database path scored before), median of ``--runs``; windows drawn from a seeded
        generator over the ranges a busy stream's bucket shows."""
        from mlengine.trends.detector import TermWindow, TrendParams, score_term, score_terms

        params = TrendParams()
        rng = np.random.default_rng(7)
        runs = max(1, options["runs"])
        result: dict[str, Any] = {"runs": runs, "windows": {}}
        for n in (1_000, 10_000, 100_000):
            cols = {
                "events": rng.integers(5, 500, n),
                "authors": rng.integers(1, 200, n),
                "bucket_total": rng.integers(500, 20_000, n),
                "source_authors": rng.integers(50, 200, n),
                "hist_events": rng.integers(0, 5_000, n),
                "prev_events": rng.integers(0, 500, n),
            }
            hist: dict[str, Any] = {
                "hist_total": 200_000,
                "hist_buckets": 24,
                "mean_bucket_total": 8_000.0,
            }
            windows = [
                TermWindow(term=f"t{i}", **{k: int(v[i]) for k, v in cols.items()}, **hist)
                for i in range(n)
            ]
            vector, scalar = [], []
            for _ in range(runs):
                started = time.perf_counter()
                score_terms(params, **cols, **hist)
                vector.append(time.perf_counter() - started)
                started = time.perf_counter()
                for window in windows:
                    score_term(window, params)
                scalar.append(time.perf_counter() - started)
            row = {
                "vectorised_us_per_window": round(statistics.median(vector) / n * 1e6, 4),
                "scalar_us_per_window": round(statistics.median(scalar) / n * 1e6, 4),
            }
            row["ratio"] = round(row["scalar_us_per_window"] / row["vectorised_us_per_window"], 1)
            result["windows"][str(n)] = row
            self.stdout.write(
                f"{n:>7} windows: score_terms {row['vectorised_us_per_window']} µs a window, "
                f"score_term {row['scalar_us_per_window']} µs ({row['ratio']}x)"
            )
        if options["json"]:
            options["json"].write_text(json.dumps(result, indent=2) + "\n")
            self.stdout.write(f"wrote {options['json']}")

    def _cuda(
        self, texts: list[str], sizes: list[int], runs: int, reference: np.ndarray
    ) -> dict[str, Any]:
        """The production path on the GPU, fp16 and fp32, at ``sizes`` and larger."""
        out: dict[str, Any] = {}
        for dtype in ("float16", "float32"):
            gpu = encoder.Encoder(device="cuda", dtype=dtype)
            rates = {}
            for size in [*sizes, 256, 512]:
                gpu.batch_size = size
                rates[str(size)] = _rate(gpu.embed, texts, runs)
            gpu.batch_size = 256
            cosine = (gpu.embed(texts) * reference).sum(axis=1)
            out[dtype] = {
                "texts_per_s": rates,
                "cosine_min": round(float(cosine.min()), 5),
            }
            out["device_name"] = gpu.info().device_name
            self.stdout.write(f"cuda {dtype}: {rates} texts/s, cosine min {cosine.min():.5f}")
        return out
