"""Test settings: the real PostgreSQL, Redis and channel layer, on their own databases.

``make test`` sets ``DATABASE_URL`` / ``REDIS_URL`` (see ``devtools/localservices.py``);
the defaults below are the local services' default ports.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("TWISCOPE_ENV", "test")
os.environ.setdefault("SECRET_KEY", "test-only-secret-key-not-for-production-use-0123")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/twiscope")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
# Tests make many requests as few users: the API's rate limits stay out of their way
# unless a test sets them (tests/test_rate_limits.py overrides the settings).
os.environ.setdefault("API_RATE_READ", "1000000/min")
os.environ.setdefault("API_RATE_WRITE", "1000000/min")
os.environ.setdefault("API_RATE_SEARCH", "1000000/min")
os.environ.setdefault("API_RATE_EXPORT", "1000000/min")

from twiscope.settings import *  # noqa: F403
from twiscope.settings import CHANNEL_LAYERS, REDIS_URL

# Test runs use their own key prefixes so a dev platform on the same Redis is untouched.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "twiscope-test",
    }
}
CHANNEL_LAYERS = {
    "default": {
        **CHANNEL_LAYERS["default"],
        "CONFIG": {**CHANNEL_LAYERS["default"]["CONFIG"], "prefix": "twiscope-test:ws"},
    }
}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
TRENDS_MIN_HISTORY_BUCKETS = 3
# Threads of async tests (database_sync_to_async, Celery test workers) must not keep
# connections open, or the test database cannot be dropped at the end of the run.
DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405
# Serve static files from the apps' folders, as runserver would: tests never run
# collectstatic, so there is no STATIC_ROOT to scan.
WHITENOISE_AUTOREFRESH = True
WHITENOISE_USE_FINDERS = True
# Heads trained by tests go to a folder of their own, never a developer's models.
MODELS_DIR = Path(tempfile.gettempdir()) / f"twiscope-test-models-{os.getpid()}"
