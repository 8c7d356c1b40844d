from __future__ import annotations

from django.apps import AppConfig


class TeamsConfig(AppConfig):
    name = "teams"

    def ready(self) -> None:
        # Connects the login throttle's signal receivers (teams/login.py).
        from teams import login  # noqa: F401
