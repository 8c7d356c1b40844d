"""The anomaly stage's series in a run (``mlengine.anomalies.stage``): the detector
groups they are stepped in, one per value transform; a series' detector state as saved
on its row; and what a run holds per series (``Slot``), per source (``Plan``) and per
anomaly being written (``Open``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from django.conf import settings

from ingest import selectors as ingest_selectors
from mlengine.anomalies.detector import Detector, Params, Step

BUCKET_S = 300
"""The detector's bucket, seconds of event time (its parameters are tuned on it)."""
COUNTS, SHARES = "counts", "shares"
STATE_KEYS = Detector.STATE_KEYS

State = dict[str, npt.NDArray[Any]]


def params_for(group: str) -> Params:
    """The detector parameters of a group: counts (volume, terms) take the tuned
    defaults; shares take no transform and ``ANOMALY_SHARE_NOISE`` as noise floor."""
    if group == COUNTS:
        return Params()
    return Params(transform="identity", noise_sd=settings.ANOMALY_SHARE_NOISE)


def backfill_buckets(params: Params) -> int:
    """Buckets of history a new term series is warmed up on: two days. A series has a
    score once its seasonal median has a day behind it and its MAD scale half a day of
    residuals (``period * 1.5 + slot_spread`` buckets: about 36 hours)."""
    return 2 * params.period


def dump_state(state: State, row: int) -> bytes:
    """One row of a detector state, as a compressed ``.npz`` (exact float64)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: state[k][row] for k in STATE_KEYS})
    return buf.getvalue()


def load_state(blob: bytes | memoryview) -> State:
    """A row saved by ``dump_state``, with a leading axis of length 1. A key missing from
    an older blob (the anomaly likelihood's) is left out; ``Group.add`` starts it fresh."""
    with np.load(io.BytesIO(bytes(blob))) as saved:
        return {k: np.asarray(saved[k])[None, ...] for k in STATE_KEYS if k in saved.files}


@dataclass
class Open:
    """An anomaly being written: new (``id`` None) or an open one read back."""

    series_id: int
    source_id: int
    window_start: datetime
    window_end: datetime
    peak_at: datetime
    score: float
    value: float
    expected: float | None
    low: float | None
    high: float | None
    evidence_created_at: datetime
    evidence_received_at: datetime
    id: int | None = None
    closed: bool = False
    changed: bool = False


@dataclass
class Slot:
    """A series in this run: its row in its group's detector and what changed."""

    series_id: int
    source_id: int
    kind: str
    term: str
    group: str
    row: int
    active: bool = True
    last_bucket: datetime | None = None
    open: Open | None = None
    watch_id: int | None = None
    watch_terms: tuple[str, ...] = ()


@dataclass
class Plan:
    """One source's work in this run: ``n`` buckets from ``start``. ``kept``: the first
    of them (an index from ``start``) whose points outlive the run's pruning;
    ``changes``: the indices at which the watched terms may change (a trend enters or
    leaves the last 24 h), set when the run jumps over empty buckets."""

    source_id: int
    first_bucket: datetime
    start: datetime
    n: int
    more: bool
    kept: int = 0
    changes: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    totals: dict[int, ingest_selectors.BucketTotals] = field(default_factory=dict)
    trends: list[tuple[str, datetime, datetime]] = field(default_factory=list)
    term_counts: dict[tuple[int, str], int] = field(default_factory=dict)
    terms: dict[str, Slot] = field(default_factory=dict)
    watches: dict[int, Slot] = field(default_factory=dict)
    watch_counts: dict[tuple[int, int], int] = field(default_factory=dict)


class Group:
    """One detector over the rows of a value transform; rows are only ever added."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.detector: Detector | None = None
        self.size = 0

    def add(self, states: Sequence[State | None]) -> list[int]:
        """Append rows (a saved state, or None for a fresh series); returns their rows."""
        if not states:
            return []
        fresh = Detector(1, self.params).state()
        parts: list[State] = [self.detector.state()] if self.detector is not None else []
        parts += [{k: fresh[k] for k in STATE_KEYS} | (s or {}) for s in states]
        stacked: dict[str, npt.NDArray[Any]] = {
            k: np.concatenate([p[k] for p in parts], axis=0) for k in STATE_KEYS
        }
        stacked["params"] = np.array(asdict(self.params), dtype=object)
        self.detector = Detector.from_state(stacked)
        rows = list(range(self.size, self.size + len(states)))
        self.size += len(states)
        return rows

    def step(self, values: npt.NDArray[np.float64]) -> Step | None:
        return self.detector.update(values) if self.detector is not None else None
