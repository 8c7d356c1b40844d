from __future__ import annotations

from django.apps import AppConfig


class MlengineConfig(AppConfig):
    name = "mlengine"
