"""Twiscope: real-time social intelligence (Django project package)."""

from __future__ import annotations

from twiscope.celery import app as celery_app

__all__ = ["celery_app"]
