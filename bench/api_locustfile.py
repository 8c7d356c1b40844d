"""The load of ``bench/api_load.py`` (locust): clients of the REST API with the bench
persona's token, each asking in turn the events list, a search, the current trends, the
alerts list and the stats, with a pause between requests (``BENCH_API_WAIT_S``, "0.5,1.5"
by default: a dashboard or an integrator polling, not a flood).

Environment: ``BENCH_API_TOKEN`` (the persona's token), ``BENCH_API_WORDS`` (comma-separated
search words, drawn at random).
"""

from __future__ import annotations

import os
import random

from locust import HttpUser, between, task

TOKEN = os.environ.get("BENCH_API_TOKEN", "")
WORDS = os.environ.get("BENCH_API_WORDS", "flight").split(",")
LOW, HIGH = (float(x) for x in os.environ.get("BENCH_API_WAIT_S", "0.5,1.5").split(","))


class ApiClient(HttpUser):
    """One client: every request carries the token; each endpoint is one locust name."""

    wait_time = between(LOW, HIGH)

    def on_start(self) -> None:
        """Authenticate every request of this client with the persona's token."""
        self.client.headers["Authorization"] = f"Token {TOKEN}"

    @task
    def events(self) -> None:
        """The newest page of events (the list's default page size)."""
        self.client.get("/api/events/", name="events")

    @task
    def search(self) -> None:
        """A search of one of the archive's words."""
        self.client.get(f"/api/events/?q={random.choice(WORDS)}", name="search")

    @task
    def trends(self) -> None:
        """The dashboard's trends panel."""
        self.client.get("/api/trends/?current=true&ordering=-score", name="trends")

    @task
    def alerts(self) -> None:
        """The alerts list's first page (the dashboard's snapshot)."""
        self.client.get("/api/alerts/", name="alerts")

    @task
    def stats(self) -> None:
        """The dashboard's tiles."""
        self.client.get("/api/stats/", name="stats")
