"""The aged platform of ``bench/replay_throughput.py --aged``: what it holds, and the pure
helpers (no Django) that the benchmark uses to build it and to compare the two modes.

A platform in use holds old sources: archives replayed months ago whose event times
span years, and feeds whose items are years old. The anomaly stage steps every source's
5-minute buckets from its first event to its watermark, so such sources leave it years
of (mostly empty) buckets to step. The aged mode gives the bench database those sources
through the product's own paths before its timed runs:

- ``OLD_ARCHIVES``, each replayed with ``manage.py replay --speed max --wait`` into a
  source of its own (2009–2016, 2012 and 2013 event times);
- ``OLD_FEEDS``, real saved feed documents (items from 2014 to 2018), served unchanged
  by ``FeedServer`` on loopback and added as RSS sources through ``POST /api/sources/``,
  so that the platform's ``sources`` process polls them (a feed's watermark follows the
  clock, so its buckets run from its oldest item to now).
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

OLD_ARCHIVES: tuple[str, ...] = (
    "trump_tweets/trump_tweets_2009_2016.csv",
    "crisislex_t26/2012_Colorado_wildfires/2012_Colorado_wildfires-tweets_labeled.csv",
    "crisislex_t26/2013_Queensland_floods/2013_Queensland_floods-tweets_labeled.csv",
)
"""Archives replayed into the aged platform, relative to the shared data folder."""

OLD_FEEDS: tuple[str, ...] = ("gulp-atom.atom", "feedburner.atom", "guardian.rss")
"""Feed documents of ``rss_feeds/`` served to the aged platform: Atom with items of
2014–2015, Atom of 2015–2016, RSS 2.0 of 2017–2018."""

TOLERANCE = 0.10
"""The aged platform's events/s may differ from the fresh one's by at most this share."""

BUCKET_S = 300
"""The anomaly stage's bucket, seconds (``mlengine.anomalies.series.BUCKET_S``)."""


class FeedServer:
    """Serves the files of ``folder`` over HTTP on ``127.0.0.1`` (a free port), in a
    daemon thread, with ``http.server``'s ``Last-Modified`` and ``If-Modified-Since``
    (a second poll of an unchanged file gets a 304). Requests are not logged."""

    def __init__(self, folder: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._server.server_address[1])

    def url(self, name: str) -> str:
        """The URL of the file ``name`` of the folder."""
        return f"http://127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        """Start serving (returns at once)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


def database_url_for(url: str, name: str) -> str:
    """``url`` (a ``postgres://`` URL) naming database ``name`` instead of its own; the
    host, port, credentials and query are kept."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def redis_url_for(url: str, db: int) -> str:
    """``url`` (a ``redis://`` URL) naming logical database ``db`` instead of its own."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def buckets_behind(last_bucket_ts: float | None, watermark_ts: float, first_ts: float) -> int:
    """Complete 5-minute buckets the anomaly stage has yet to step for a source: from the
    bucket after ``last_bucket_ts`` (the last one stepped; None: none yet, so from the
    bucket of ``first_ts``, the first event) up to ``watermark_ts``. POSIX seconds."""
    start = first_ts // BUCKET_S * BUCKET_S if last_bucket_ts is None else last_bucket_ts + BUCKET_S
    return max(0, int(watermark_ts - start) // BUCKET_S)


def cpu_description(cpuinfo: str) -> dict[str, Any]:
    """The CPU model and its AVX-512 flags from the text of ``/proc/cpuinfo`` (Linux):
    ``{"model": str | None, "avx512": bool, "avx512_flags": [..]}``."""
    model = None
    flags: list[str] = []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = value.split()
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    return {"model": model, "avx512": bool(avx512), "avx512_flags": avx512}


def compare(fresh: Mapping[str, Any], aged: Mapping[str, Any]) -> dict[str, Any]:
    """The aged platform against the fresh one, from the two runs' ``median`` blocks:
    ratios aged ÷ fresh of events/s and of the alert latency percentiles (None where a
    side has no value), and ``within_tolerance``: whether the events/s ratio lies within
    ``1 ± TOLERANCE``."""

    def ratio(key: str) -> float | None:
        low, high = fresh.get(key), aged.get(key)
        return round(high / low, 3) if low and high is not None else None

    rate = ratio("events_per_s")
    return {
        "events_per_s": {"fresh": fresh.get("events_per_s"), "aged": aged.get("events_per_s")},
        "events_per_s_ratio": rate,
        "steady_events_per_s_ratio": ratio("steady_events_per_s"),
        "alert_latency_p50_ratio": ratio("alert_latency_p50_ms"),
        "alert_latency_p95_ratio": ratio("alert_latency_p95_ms"),
        "alert_latency_p99_ratio": ratio("alert_latency_p99_ms"),
        "tolerance": TOLERANCE,
        "within_tolerance": rate is not None and abs(rate - 1) <= TOLERANCE,
    }
