"""Structured logging: dotted event names with key=value fields, through stdlib logging.

Usage: ``log = structlog.get_logger(__name__)`` then
``log.info("ingest.batch_persisted", source_id=3, inserted=250)``.
"""

from __future__ import annotations

import structlog


def configure() -> None:
    """Route structlog through the stdlib logging configured in ``settings.LOGGING``."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=False),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
