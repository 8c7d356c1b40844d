"""Twiscope settings, read from the environment.

Every value comes through one typed reader (django-environ's ``FileAwareEnv``): a
missing required key raises ``ImproperlyConfigured`` naming the key, a malformed value
is refused, and any secret may instead be given as ``<KEY>_FILE`` (a path whose
contents are the value, as with Docker secrets).

Required: ``SECRET_KEY``, ``DATABASE_URL``, ``REDIS_URL``. ``make run`` and
``make test`` provide all three (see ``devtools/localservices.py``). In development
(``TWISCOPE_ENV`` unset or ``development``), any of them left unset is taken from the
running ``make run``'s env file (``.run/env``, or ``$TWISCOPE_RUN_DIR/env``), so commands
typed in a second terminal reach that platform; never in production or test settings,
and never over a variable that is set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import environ
from django.core.exceptions import ImproperlyConfigured

from twiscope.ratelimit import parse_rate

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.FileAwareEnv()

TWISCOPE_ENV: str = env.str("TWISCOPE_ENV", default="development")
if TWISCOPE_ENV not in {"development", "production", "test"}:
    raise ImproperlyConfigured(
        f"TWISCOPE_ENV must be development, production or test, not {TWISCOPE_ENV!r}"
    )
if TWISCOPE_ENV == "development":
    from twiscope.platform_env import load_platform_env

    load_platform_env()
DEBUG: bool = env.bool("DJANGO_DEBUG", default=False)
if DEBUG and TWISCOPE_ENV == "production":
    raise ImproperlyConfigured("DJANGO_DEBUG must be off when TWISCOPE_ENV=production")

SECRET_KEY: str = env.str("SECRET_KEY")
if TWISCOPE_ENV == "production" and len(SECRET_KEY) < 32:
    raise ImproperlyConfigured("SECRET_KEY must be at least 32 characters in production")
ALLOWED_HOSTS: list[str] = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS: list[str] = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    # Hashed API tokens (teams.ApiToken, KNOX_TOKEN_MODEL): the library's model and
    # digest; DRF's plaintext rest_framework.authtoken is gone (teams migration 0002).
    "knox",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "teams",
    "ingest",
    "mlengine",
    "alerts",
    "dashboard",
]

MIDDLEWARE = [
    # First: it must see what every other middleware raises (twiscope/outage.py).
    "twiscope.outage.DependencyUnavailableMiddleware",
    # Errors under /api/ in JSON, 404s of unknown URLs included (teams/api/errors.py).
    "teams.api.errors.ApiJsonErrorsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # After authentication: replays keyed API writes (teams/api/idempotency.py).
    "teams.api.idempotency.IdempotencyMiddleware",
    # RateLimit-* headers of the throttled API requests (teams/api/throttling.py).
    "teams.api.throttling.RateLimitHeadersMiddleware",
]

ROOT_URLCONF = "twiscope.urls"
ASGI_APPLICATION = "twiscope.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.db_url("DATABASE_URL")}
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL: str = env.str("REDIS_URL")

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "twiscope",
    }
}
HOT_CACHE_TTL_S: int = env.int("HOT_CACHE_TTL_S", default=300)
"""How long a hot read (``twiscope.hotcache``: stats, first pages of trends and alerts)
is kept at most, in seconds; the pipeline's generation bumps replace it sooner. 0: off."""

CHANNEL_LAYERS: dict[str, Any] = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            "hosts": [REDIS_URL],
            "prefix": "twiscope:ws",
            "capacity": 1000,
            "expiry": 30,
        },
    }
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard:home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

# --- Transport security (``manage.py check --deploy`` passes in production) ------------
# Each defaults to on in production (TWISCOPE_ENV=production) and off elsewhere; each
# may be set on its own (docker-compose.yml, served over plain HTTP on loopback, turns
# the redirect and HSTS off).
_PRODUCTION = TWISCOPE_ENV == "production"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE: bool = env.bool("SESSION_COOKIE_SECURE", default=_PRODUCTION)
CSRF_COOKIE_SECURE: bool = env.bool("CSRF_COOKIE_SECURE", default=_PRODUCTION)
SECURE_SSL_REDIRECT: bool = env.bool("SECURE_SSL_REDIRECT", default=_PRODUCTION)
# The health probe is answered over plain HTTP too (orchestrators probe the container).
SECURE_REDIRECT_EXEMPT = [r"^health/$"]
# Strict-Transport-Security: a year in production. Browsers honour it only on HTTPS.
SECURE_HSTS_SECONDS: int = env.int("SECURE_HSTS_SECONDS", default=365 * 86400 if _PRODUCTION else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS: bool = env.bool(
    "SECURE_HSTS_INCLUDE_SUBDOMAINS", default=_PRODUCTION
)
# Preloading is a promise to browsers' lists that is slow to undo: asked for, not assumed.
SECURE_HSTS_PRELOAD: bool = env.bool("SECURE_HSTS_PRELOAD", default=False)
# Reverse proxies in front of the web process that append X-Forwarded-For and set
# X-Forwarded-Proto. 0 (the default): none, and both headers are ignored (a client could
# forge them). Above 0: the proxy's X-Forwarded-Proto says whether the request came over
# HTTPS (SECURE_PROXY_SSL_HEADER), and the client's address for the rate limits is the
# one that many hops from the right of X-Forwarded-For (DRF's NUM_PROXIES).
TRUSTED_PROXY_HOPS: int = env.int("TRUSTED_PROXY_HOPS", default=0)
if TRUSTED_PROXY_HOPS < 0:
    raise ImproperlyConfigured("TRUSTED_PROXY_HOPS must be 0 or more")
if TRUSTED_PROXY_HOPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
X_FRAME_OPTIONS = "DENY"

# --- Rate limits (teams/api/throttling.py, teams/login.py; twiscope/ratelimit.py) ------
# Per caller (a user and the credential used: each API token has its own budget, a
# user's sessions share one; anonymous callers by address) and scope, DRF rate strings
# (1000/min, 10/s, 5000/hour; also 10/15m), counted in fixed windows in Redis.


def _rate(key: str, default: str) -> str:
    value: str = env.str(key, default=default)
    try:
        parse_rate(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{key}: {exc}") from None
    return value


API_RATE_READ = _rate("API_RATE_READ", "1200/min")
API_RATE_WRITE = _rate("API_RATE_WRITE", "300/min")
API_RATE_SEARCH = _rate("API_RATE_SEARCH", "300/min")
API_RATE_EXPORT = _rate("API_RATE_EXPORT", "30/min")
# Failed logins (the dashboard's, the admin's: any password check), per username and
# per client address; past either, logins are refused until the window ends.
LOGIN_RATE_USERNAME = _rate("LOGIN_RATE_USERNAME", "10/15min")
LOGIN_RATE_IP = _rate("LOGIN_RATE_IP", "50/15min")
AUTHENTICATION_BACKENDS = ["teams.login.ThrottledModelBackend"]

# --- API tokens (teams.ApiToken: django-rest-knox's model, named, hashed at rest) -----
KNOX_TOKEN_MODEL = "teams.ApiToken"
# Knox's migrations create its own table even when its model is swapped out; without
# them nothing of knox's is created (a swapped model is never synced).
MIGRATION_MODULES = {"knox": None}
REST_KNOX: dict[str, Any] = {
    # Stored: the SHA-512 of the token and its first 15 characters (the lookup prefix).
    # The 0002 migration hashed DRF's old keys the same way: do not change either.
    "SECURE_HASH_ALGORITHM": "hashlib.sha512",
    "AUTH_TOKEN_CHARACTER_LENGTH": 64,
    # A token is written "tws_" + 64 hex digits (256 random bits): the prefix lets
    # secret scanners and people tell it apart.
    "TOKEN_PREFIX": "tws_",
    "TOKEN_TTL": None,
    "AUTH_HEADER_PREFIX": "Token",
}
# The most tokens one user may hold (expired ones included, until revoked).
API_TOKENS_PER_USER: int = env.int("API_TOKENS_PER_USER", default=50)
# A token's "last used" is written at most this often (seconds), never once a request.
API_TOKEN_LAST_USED_EVERY_S: int = 60

REST_FRAMEWORK: dict[str, Any] = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "teams.api.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # One throttle for every view, its scope chosen from the request (read, write,
    # search, export): teams/api/throttling.py.
    "DEFAULT_THROTTLE_CLASSES": ["teams.api.throttling.ApiRateThrottle"],
    "NUM_PROXIES": TRUSTED_PROXY_HOPS,
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # Unknown or bad query parameters answer 400 (teams/api/filters.py, pagination.py).
    "DEFAULT_FILTER_BACKENDS": ["teams.api.filters.StrictFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "teams.api.pagination.NumberedPagination",
    "PAGE_SIZE": 50,
    # drf-spectacular's, documenting 400/401/403/404 in DRF's error shapes.
    "DEFAULT_SCHEMA_CLASS": "teams.api.schema.AutoSchema",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
}
if DEBUG:
    REST_FRAMEWORK["DEFAULT_RENDERER_CLASSES"].append(
        "rest_framework.renderers.BrowsableAPIRenderer"
    )

SPECTACULAR_SETTINGS = {
    "TITLE": "Twiscope API",
    "DESCRIPTION": "Events, trends, alerts and pipeline statistics. "
    "Authenticate with `Authorization: Token <key>`.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Two models have a "kind": name each choice set after its model.
    "ENUM_NAME_OVERRIDES": {
        "SourceKindEnum": "ingest.models.Source.Kind",
        "AlertRuleKindEnum": "alerts.models.AlertRule.Kind",
        # A source's health keeps the name it had before alerts had a state too.
        "StateEnum": ["disabled", "failing", "backing_off", "running"],
        "AlertStateEnum": "alerts.models.Alert.State",
    },
}

# --- Celery -----------------------------------------------------------------------
CELERY_BROKER_URL: str = env.str("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_TASK_ALWAYS_EAGER: bool = False

# --- Pipeline -----------------------------------------------------------------------
# Events per task on the ingest queue (DESIGN.md: micro-batches, never one per event).
INGEST_BATCH_SIZE: int = env.int("INGEST_BATCH_SIZE", default=500)
# Back-pressure of a full-speed replay: at most this many events in flight at once.
REPLAY_MAX_IN_FLIGHT: int = env.int("REPLAY_MAX_IN_FLIGHT", default=750)
# The team `manage.py replay` replays into when no --team is given (a slug; empty: the
# only team, else the demo team that `make run` creates).
TWISCOPE_TEAM: str = env.str("TWISCOPE_TEAM", default="")
# An item (an event, a trend, a stream step) that fails alone this many times in a
# stage is parked as a dead letter instead of being sent again (``twiscope.guard``).
DEAD_LETTER_MAX_ATTEMPTS: int = env.int("DEAD_LETTER_MAX_ATTEMPTS", default=3)
if DEAD_LETTER_MAX_ATTEMPTS < 1:
    raise ImproperlyConfigured("DEAD_LETTER_MAX_ATTEMPTS must be at least 1")

# Trained classifier heads (``manage.py train``): their artefacts live here; each has a
# ModelVersion row in this platform's database, so in development the folder is the
# platform's run dir's (``make run``: .run/models; ``make bench``: .run/bench/models).
# A volume in docker-compose.
if TWISCOPE_ENV == "development":
    from twiscope.platform_env import platform_run_dir

    _MODELS_DEFAULT = platform_run_dir(os.environ) / "models"
else:
    _MODELS_DEFAULT = BASE_DIR / ".run" / "models"
MODELS_DIR = Path(env.str("TWISCOPE_MODELS_DIR", default=str(_MODELS_DEFAULT)))
# Transformer labels of new events (mlengine/inference/scoring.py, the `inference` queue): an
# event that waited longer than SCORING_LAG_S seconds keeps its VADER label; a model
# batch holds at most SCORING_BATCH_SIZE events; one task runs at most SCORING_BUDGET_S
# seconds before it queues the next.
SCORING_LAG_S: float = env.float("SCORING_LAG_S", default=10.0)
SCORING_BATCH_SIZE: int = env.int("SCORING_BATCH_SIZE", default=128)
SCORING_BUDGET_S: float = env.float("SCORING_BUDGET_S", default=20.0)
# The model gets only the CPU the pipeline leaves idle: the inference worker's processes
# run under SCHED_IDLE (nice 19 where the OS has no such policy), and a scoring task
# pauses while the pipeline has more work in hand than it takes at once (the events it
# cannot reach in time keep VADER's label). Off for a GPU worker.
INFERENCE_IDLE_ONLY: bool = env.bool("INFERENCE_IDLE_ONLY", default=True)
SCORING_BUSY_POLL_S: float = 0.05
# ...and while events arrive faster than this (events/s over the last 2 s, all sources):
# a burst is far beyond what the heads label on a CPU, and the pipeline needs the cores.
SCORING_PAUSE_ABOVE_EPS: float = env.float("SCORING_PAUSE_ABOVE_EPS", default=300.0)
# Seconds between two refreshes, by a worker's main process, of the dispatch records of
# the messages it holds (prefetched, waiting for a countdown, running).
PIPELINE_HEARTBEAT_S: float = env.float("PIPELINE_HEARTBEAT_S", default=5.0)
# Seconds after which a dispatched item whose record no worker refreshed, and that no
# message in its queue carries, is taken for lost and sent again (twiscope.pipeline.
# stuck). A worker refreshes the records of the messages it holds every 5 s
# (PIPELINE_HEARTBEAT_S), so 30 s is several missed heartbeats: no live worker holds it.
PIPELINE_STUCK_AFTER_S: float = env.float("PIPELINE_STUCK_AFTER_S", default=30.0)
# Seconds after which a dispatched item whose record no worker refreshed is taken for
# lost and sent again even while its queue is busy and cannot be read (a broker other
# than Redis; the last resort, twiscope.pipeline.stuck). Twice the
# broker's visibility timeout (3600 s, twiscope.celery) plus the longest task time limit
# (120 s): past it, no worker holds the message nor will Redis redeliver it.
PIPELINE_LOST_AFTER_S: float = env.float("PIPELINE_LOST_AFTER_S", default=2 * (3600 + 120))

# --- Sources ---------------------------------------------------------------------------
# Fernet keys (comma-separated, newest first) that encrypt source credentials at rest;
# older keys still decrypt, so a key is rotated by putting a new one in front
# (ingest/credentials.py). Required in production; `make run` generates one under .run/.
CREDENTIAL_KEYS: list[str] = env.list("TWISCOPE_CREDENTIAL_KEYS", default=[])
if TWISCOPE_ENV == "production" and not CREDENTIAL_KEYS:
    raise ImproperlyConfigured("TWISCOPE_CREDENTIAL_KEYS must be set in production")
# Fetch feed URLs that resolve to loopback, private or link-local addresses (SSRF guard
# off): for feeds on the developer's own machine; `make run` turns it on.
SOURCES_ALLOW_PRIVATE_URLS: bool = env.bool("SOURCES_ALLOW_PRIVATE_URLS", default=False)
# Signed webhooks: the largest body (bytes), the most events a request, and how far
# X-Twiscope-Timestamp may be from now (seconds).
# Idempotency-Key on API writes (teams/api/idempotency.py): how long a write's response
# is kept for its retries, and how long a write in flight holds its key (seconds).
IDEMPOTENCY_TTL_S: int = env.int("IDEMPOTENCY_TTL_S", default=24 * 3600)
IDEMPOTENCY_LOCK_S: int = env.int("IDEMPOTENCY_LOCK_S", default=60)
WEBHOOK_MAX_BYTES: int = env.int("WEBHOOK_MAX_BYTES", default=1024 * 1024)
WEBHOOK_MAX_EVENTS: int = env.int("WEBHOOK_MAX_EVENTS", default=1000)
WEBHOOK_TOLERANCE_S: int = env.int("WEBHOOK_TOLERANCE_S", default=300)

# --- Delivery (notify) -------------------------------------------------------------------
# The dashboard's public base URL: Slack messages and emails link to an alert there.
PUBLIC_BASE_URL: str = env.str("PUBLIC_BASE_URL", default="http://127.0.0.1:8000").rstrip("/")
# Seconds one outgoing webhook or Slack call may take (connect and read, each); the
# channel test-send of the API uses DELIVERY_TEST_TIMEOUT_S so a request stays short.
DELIVERY_TIMEOUT_S: float = env.float("DELIVERY_TIMEOUT_S", default=10.0)
DELIVERY_TEST_TIMEOUT_S: float = env.float("DELIVERY_TEST_TIMEOUT_S", default=5.0)
# Tries of one delivery before it is marked failed, and the backoff between them:
# full jitter, uniform in [0, min(MAX, BASE x 2^n)] s before try n+1 (alerts/delivery.py);
# with the defaults the tries spread over about a day (expected ~20 h, at most ~40 h).
DELIVERY_MAX_ATTEMPTS: int = env.int("DELIVERY_MAX_ATTEMPTS", default=15)
DELIVERY_BACKOFF_BASE_S: float = env.float("DELIVERY_BACKOFF_BASE_S", default=15.0)
DELIVERY_BACKOFF_MAX_S: float = env.float("DELIVERY_BACKOFF_MAX_S", default=8 * 3600.0)
# Consecutive failed tries after which a channel shows as failing (its `health`).
DELIVERY_FAILING_AFTER: int = env.int("DELIVERY_FAILING_AFTER", default=3)
# Email: Django's SMTP backend, configured from the environment. EMAIL_TIMEOUT bounds
# every SMTP call (Django's default waits for ever).
EMAIL_BACKEND: str = env.str("EMAIL_BACKEND", default="django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST: str = env.str("EMAIL_HOST", default="localhost")
EMAIL_PORT: int = env.int("EMAIL_PORT", default=25)
EMAIL_HOST_USER: str = env.str("EMAIL_HOST_USER", default="")
EMAIL_HOST_PASSWORD: str = env.str("EMAIL_HOST_PASSWORD", default="")
EMAIL_USE_TLS: bool = env.bool("EMAIL_USE_TLS", default=False)
EMAIL_USE_SSL: bool = env.bool("EMAIL_USE_SSL", default=False)
EMAIL_TIMEOUT: float = env.float("EMAIL_TIMEOUT", default=10.0)
DEFAULT_FROM_EMAIL: str = env.str("DEFAULT_FROM_EMAIL", default="twiscope@localhost")

# --- Search -----------------------------------------------------------------------------
# The class answering `q` on /api/events/ (ingest.search.SearchBackend): a dotted path.
SEARCH_BACKEND: str = env.str("SEARCH_BACKEND", default="ingest.search.PostgresSearch")
# A search given neither since/until nor source covers this many days of event time, up
# to the newest event of the caller's sources (not after now), so its cost is bounded.
# An event dated more than this many seconds ahead of now is refused at every way in
# (ingest/envelope.py): the webhook answers 400 on created_at, the pipeline parks it.
EVENT_MAX_FUTURE_S: int = env.int("EVENT_MAX_FUTURE_S", default=86400)
if EVENT_MAX_FUTURE_S < 0:
    raise ImproperlyConfigured("EVENT_MAX_FUTURE_S must be at least 0")
SEARCH_DEFAULT_WINDOW_DAYS: int = env.int("SEARCH_DEFAULT_WINDOW_DAYS", default=30)
if SEARCH_DEFAULT_WINDOW_DAYS < 1:
    raise ImproperlyConfigured("SEARCH_DEFAULT_WINDOW_DAYS must be at least 1")

# --- Enrichment ------------------------------------------------------------------------
# ISO 639-1 codes the language detector chooses among (more cost time and memory).
ENRICH_LANGUAGES: list[str] = env.list(
    "ENRICH_LANGUAGES",
    default=[
        "en",
        "es",
        "pt",
        "fr",
        "de",
        "it",
        "nl",
        "ru",
        "uk",
        "ar",
        "tr",
        "ja",
        "ko",
        "zh",
        "hi",
        "id",
        "tl",
        "pl",
        "sv",
        "fa",
        "he",
        "el",
        "ca",
    ],
)

# --- Trend detection (event time; see mlengine/trends/detector.py) ------------------------------
TRENDS_BUCKET_S: int = env.int("TRENDS_BUCKET_S", default=900)
TRENDS_BASELINE_BUCKETS: int = env.int("TRENDS_BASELINE_BUCKETS", default=24)
# Buckets of history a stream needs before a term may trend. 0: none; a stream's first
# bucket judges a term against Jeffreys' prior (every term expected in half the
# posts), so only a term that dominates a new stream trends (docs/detectors.md).
TRENDS_MIN_HISTORY_BUCKETS: int = env.int("TRENDS_MIN_HISTORY_BUCKETS", default=0)
# The baseline's prior weight in posts: an unseen term is taken to hold one post in
# twice this many until the stream shows otherwise (mlengine/trends/detector.py). It matters
# only while a baseline is a handful of posts, as when a stream opens with its burst.
TRENDS_PRIOR_POSTS: float = env.float("TRENDS_PRIOR_POSTS", default=5.0)
TRENDS_MIN_SCORE: float = env.float("TRENDS_MIN_SCORE", default=4.0)
TRENDS_MIN_EVENTS: int = env.int("TRENDS_MIN_EVENTS", default=5)
TRENDS_MIN_AUTHORS: int = env.int("TRENDS_MIN_AUTHORS", default=3)
# A term in at least this share of its baseline's posts is always on in its stream (a
# brand handle in a brand-complaints stream): it neither starts nor links a story by itself.
TRENDS_ALWAYS_ON_SHARE: float = env.float("TRENDS_ALWAYS_ON_SHARE", default=0.01)
# A new trend joins the live story holding at least this share of its recent posts
# (mlengine.stories.choose_story); else it starts a story of its own.
TRENDS_STORY_MIN_OVERLAP: float = env.float("TRENDS_STORY_MIN_OVERLAP", default=0.5)
# Fire a trend early, marked as a prediction, when its bucket's projected count passes
# the test and its count grows and accelerates (mlengine.trends.TermStream, services).
TRENDS_EMERGING: bool = env.bool("TRENDS_EMERGING", default=True)
# The projection behind an emerging trend starts from the count so far less this many
# Poisson standard deviations: a handful of early posts of an everyday word projects
# little (docs/detectors.md).
TRENDS_EMERGING_SIGMAS: float = env.float("TRENDS_EMERGING_SIGMAS", default=1.0)
# Allowed lateness of live sources: their declared watermark is processing time minus
# this; an event arriving later than this after its event time is late (stored, left out
# of trends). It is also the floor of a live alert's latency. Replays declare their own
# watermark (the last event time staged) and have no late events.
TRENDS_LIVE_LATENESS_S: float = env.float("TRENDS_LIVE_LATENESS_S", default=1.0)
# A feed's allowed lateness beyond its poll interval, seconds (items are often dated
# before they appear in the feed).
TRENDS_FEED_LATENESS_S: float = env.float("TRENDS_FEED_LATENESS_S", default=3600.0)

# --- Anomaly stage (event time, 5-minute buckets; see mlengine/anomalies/stage.py) -------
# Term series per source (the terms of its trends of the last 24 h of event time).
ANOMALY_MAX_TERMS: int = env.int("ANOMALY_MAX_TERMS", default=50)
# Watches a team may have (each is a series in every source it covers).
ANOMALY_MAX_WATCHES: int = env.int("ANOMALY_MAX_WATCHES", default=50)
# Buckets one run of the stage steps per source at most (then it queues itself again).
ANOMALY_MAX_BUCKETS: int = env.int("ANOMALY_MAX_BUCKETS", default=288)
# Buckets one run steps over all sources at most, shared out among the sources due: a
# run stays well inside the task's time limit when many sources catch up at once.
ANOMALY_MAX_STEPS: int = env.int("ANOMALY_MAX_STEPS", default=2880)
# What a run of empty buckets that the stage crosses in closed form (a jump) counts for
# against those two budgets, per series of the source, in buckets stepped one at a time:
# about its cost (bench/anomaly_stage.py --sparse-years).
ANOMALY_JUMP_COST: int = env.int("ANOMALY_JUMP_COST", default=4)
# Points a run writes at most for the buckets it jumps, per source (in its share of the
# run): a run that jumps past two weeks keeps two weeks of points of every series. About
# a second of COPY on 2 cores; sources of up to 12 series never reach it.
ANOMALY_MAX_POINTS: int = env.int("ANOMALY_MAX_POINTS", default=50_000)
# The stage yields to the pipeline: while events are stored faster than
# SCORING_PAUSE_ABOVE_EPS or the pipeline has a batch in hand (the transformer heads'
# tests), a run waits ANOMALY_YIELD_POLL_S and looks again, for at most
# ANOMALY_YIELD_MAX_S in a row; then it runs one bounded step whatever the load, so a
# loaded platform's anomaly alerts come late by at most that, never not at all.
ANOMALY_YIELD: bool = env.bool("ANOMALY_YIELD", default=True)
ANOMALY_YIELD_POLL_S: float = env.float("ANOMALY_YIELD_POLL_S", default=2.0)
ANOMALY_YIELD_MAX_S: float = env.float("ANOMALY_YIELD_MAX_S", default=60.0)
# Series points are kept this long behind their source's latest bucket (event time).
ANOMALY_RETENTION_S: int = env.int("ANOMALY_RETENTION_S", default=14 * 86400)
# Noise floor of the negative-share detector, in share units (the volume detector's is
# Poisson noise): with the default 5.5 threshold and 9-bucket smoothing, a share must
# rise by about 0.18 for 45 minutes to be flagged when its history is flat.
ANOMALY_SHARE_NOISE: float = env.float("ANOMALY_SHARE_NOISE", default=0.1)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "kv": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "kv"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
        # Which AES library it found, at INFO, as every command starts: noise.
        "telethon.crypto.aes": {"level": "WARNING"},
    },
}

from twiscope import logconf  # noqa: E402

logconf.configure()
