"""Serializers of sources, events and dead letters."""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any, cast

from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import URLValidator
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from ingest import search
from ingest.counters import events_last_hour
from ingest.exporting import EVENT_FIELDS
from ingest.models import DeadLetter, Event, Source
from ingest.selectors import source_state
from ingest.sources.base import SourceError
from ingest.sources.http import UnsafeURL, check_url
from ingest.sources.rss.adapter import (
    DEFAULT_POLL_INTERVAL_S,
    MAX_POLL_INTERVAL_S,
    MIN_POLL_INTERVAL_S,
)
from ingest.sources.telegram import adapter as tg_adapter
from ingest.sources.x import adapter as x_adapter
from teams.api.base import StrictModelSerializer, limit_to_owned_teams, refuse_changes
from teams.models import Team

API_KINDS = (Source.Kind.RSS, Source.Kind.WEBHOOK, Source.Kind.X, Source.Kind.TELEGRAM)
"""The kinds a user can create through the API: those whose adapter this release runs.
Replay sources are made by ``manage.py replay``."""


class SourceSerializer(StrictModelSerializer):
    """A source. Owners of its team create and edit it; ``team`` (default: the caller's
    team, when they own exactly one) and ``kind`` are fixed once it exists.
    ``credentials`` is write-only (encrypted at rest, never returned). ``state``:
    ``disabled``, ``failing`` (a permanent error: fixed by editing the source),
    ``backing_off`` (a temporary error, retried) or ``running``. A webhook source's
    signing secret is generated on creation and returned once, in ``secret``.
    """

    team = serializers.PrimaryKeyRelatedField(queryset=Team.objects.none(), required=False)
    kind = serializers.ChoiceField(choices=Source.Kind.choices)
    config = serializers.DictField(required=False)
    credentials = serializers.DictField(write_only=True, required=False)
    state = serializers.SerializerMethodField()
    events_last_hour = serializers.SerializerMethodField(
        help_text="Events stored for the source in the last 60 minutes (processing time)."
    )

    class Meta:
        model = Source
        fields = [
            "id",
            "team",
            "kind",
            "name",
            "config",
            "credentials",
            "enabled",
            "state",
            "disabled_reason",
            "last_error",
            "error_permanent",
            "last_error_at",
            "created_at",
            "input_watermark",
            "last_received_at",
            "events_total",
            "events_last_hour",
        ]
        # The model's own fields a client cannot set (the declared ones say for
        # themselves).
        read_only_fields = [
            name
            for name in fields
            if name not in ("team", "kind", "name", "config", "credentials", "enabled")
        ]
        # A name taken in the team is reported on ``name`` by the view (its unique key).
        validators: list[Any] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limit_to_owned_teams(self)

    @extend_schema_field(
        {"type": "string", "enum": ["disabled", "failing", "backing_off", "running"]}
    )
    def get_state(self, source: Source) -> str:
        return source_state(source)

    def get_events_last_hour(self, source: Source) -> int:
        return events_last_hour(source.id)

    def to_representation(self, instance: Source) -> dict[str, Any]:
        """The source; a replay source's archive shows as its file name alone, in
        ``config.path`` and in its errors (the server's directories are nobody's
        business but its operator's, who sees them with ``manage.py``)."""
        data: dict[str, Any] = super().to_representation(instance)
        config = data.get("config")
        if isinstance(config, dict) and isinstance(config.get("path"), str):
            path = config["path"]
            data["config"] = {**config, "path": PurePath(path).name}
            for name in ("last_error", "disabled_reason"):
                if isinstance(data.get(name), str):
                    data[name] = data[name].replace(path, PurePath(path).name)
        return data

    def _only_owned_team(self) -> Team:
        """The team a create without ``team`` is for: the caller's only owned team."""
        teams = list(self.fields["team"].queryset[:2])  # type: ignore[attr-defined]
        if len(teams) != 1:
            reason = "you own no team" if not teams else "you own several teams: say which"
            raise serializers.ValidationError({"team": reason})
        return teams[0]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if self.instance is not None:
            refuse_changes(attrs, self.instance, "team", "kind")
            kind = self.instance.kind
        else:
            if "team" not in attrs:
                attrs["team"] = self._only_owned_team()
            kind = attrs["kind"]
            if kind not in API_KINDS:
                raise serializers.ValidationError(
                    {
                        "kind": f"{kind!r} sources cannot be created here; this release "
                        f"creates: {', '.join(API_KINDS)}"
                    }
                )
        if "config" in attrs or self.instance is None:
            attrs["config"] = validate_config(kind, attrs.get("config", {}))
        if "credentials" in attrs and kind == Source.Kind.WEBHOOK:
            raise serializers.ValidationError(
                {"credentials": "a webhook source's secret is generated, not given"}
            )
        if attrs.get("credentials") and kind == Source.Kind.RSS:
            raise serializers.ValidationError({"credentials": "feeds take no credentials"})
        if kind == Source.Kind.TELEGRAM and (self.instance is None or "credentials" in attrs):
            validate_telegram_credentials(attrs.get("credentials") or {})
        if kind == Source.Kind.X and (self.instance is None or "credentials" in attrs):
            token = (attrs.get("credentials") or {}).get("bearer_token")
            if not isinstance(token, str) or not token.strip():
                raise serializers.ValidationError(
                    {"credentials": {"bearer_token": ["required: your X app's bearer token"]}}
                )
        return attrs


POLL_INTERVALS: dict[str, tuple[int, int, int]] = {
    Source.Kind.RSS: (DEFAULT_POLL_INTERVAL_S, MIN_POLL_INTERVAL_S, MAX_POLL_INTERVAL_S),
    Source.Kind.X: (
        x_adapter.DEFAULT_POLL_INTERVAL_S,
        x_adapter.MIN_POLL_INTERVAL_S,
        x_adapter.MAX_POLL_INTERVAL_S,
    ),
    Source.Kind.TELEGRAM: (
        tg_adapter.DEFAULT_POLL_INTERVAL_S,
        tg_adapter.MIN_POLL_INTERVAL_S,
        tg_adapter.MAX_POLL_INTERVAL_S,
    ),
}
"""Per polling kind: ``poll_interval_s``'s default, minimum and maximum (seconds)."""


def _names(value: Any, limit: int) -> list[str] | None:
    """``value`` as 1 to ``limit`` non-blank strings of at most 128 characters, stripped;
    None when it is not that."""
    if not isinstance(value, list) or not 1 <= len(value) <= limit:
        return None
    if not all(isinstance(v, str) and v.strip() and len(v) <= 128 for v in value):
        return None
    return [v.strip() for v in value]


def validate_config(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` checked for ``kind``; returns it normalised.

    - webhook: no settings;
    - rss: ``url`` (http or https, refused when it resolves to a loopback, private or
      link-local address unless ``SOURCES_ALLOW_PRIVATE_URLS``);
    - x: ``keywords`` (1 to 25 words or phrases, their query at most 512 characters),
      ``stream`` (default true: the filtered stream where the app has it);
    - telegram: ``channels`` (1 to 50 names or ids; ``@`` and ``t.me/`` dropped),
      ``live`` (default true: new-message events, ``ingest.streaming``);
    - and for the polling kinds ``poll_interval_s``, whole seconds (``POLL_INTERVALS``).

    Raises:
        serializers.ValidationError: ``{"config": {...}}`` naming the settings at fault.
    """
    main: dict[str, str] = {
        Source.Kind.RSS: "url",
        Source.Kind.X: "keywords",
        Source.Kind.TELEGRAM: "channels",
    }
    allowed = {main[kind], "poll_interval_s"} if kind in main else set()
    if kind == Source.Kind.X:
        allowed.add("stream")
    if kind == Source.Kind.TELEGRAM:
        allowed.add("live")
    unknown = f"unknown setting for a {kind} source"
    errors: dict[str, str] = dict.fromkeys(sorted(set(config) - allowed), unknown)
    clean: dict[str, Any] = {}
    if kind == Source.Kind.RSS:
        url = config.get("url")
        try:
            if not isinstance(url, str) or not url.strip():
                raise DjangoValidationError("required")
            URLValidator(schemes=["http", "https"])(url.strip())
            check_url(url.strip())
            clean["url"] = url.strip()
        except DjangoValidationError:
            errors["url"] = "required: the feed's http(s) URL"
        except UnsafeURL as exc:
            errors["url"] = str(exc)
    if kind == Source.Kind.X:
        keywords = _names(config.get("keywords"), x_adapter.MAX_KEYWORDS)
        if keywords is None:
            errors["keywords"] = (
                f"1 to {x_adapter.MAX_KEYWORDS} non-blank words or phrases (128 characters each)"
            )
        elif len(x_adapter.build_query(keywords)) > x_adapter.MAX_QUERY_CHARS:
            errors["keywords"] = f"their query is over {x_adapter.MAX_QUERY_CHARS} characters"
        clean["keywords"] = keywords
        stream = config.get("stream", True)
        if not isinstance(stream, bool):
            errors["stream"] = "true (the filtered stream, when the app has it) or false"
        clean["stream"] = stream
    if kind == Source.Kind.TELEGRAM:
        channels = _names(config.get("channels"), tg_adapter.MAX_CHANNELS)
        keys = [tg_adapter.channel_key(c) for c in channels or []]
        if not keys or not all(keys):
            errors["channels"] = f"1 to {tg_adapter.MAX_CHANNELS} channel names or ids"
        clean["channels"] = keys
        live = config.get("live", True)
        if not isinstance(live, bool):
            errors["live"] = "true (new messages as they come, and a read every interval) or false"
        clean["live"] = live
    if kind in POLL_INTERVALS:
        default, low, high = POLL_INTERVALS[kind]
        interval = config.get("poll_interval_s", default)
        if (
            isinstance(interval, bool)
            or not isinstance(interval, int)
            or not low <= interval <= high
        ):
            errors["poll_interval_s"] = f"whole seconds from {low} to {high}"
        clean["poll_interval_s"] = interval
    if errors:
        raise serializers.ValidationError({"config": errors})
    return clean


def validate_telegram_credentials(given: dict[str, Any]) -> None:
    """``api_id`` (whole number), ``api_hash`` and a ``session`` string or a
    ``bot_token``.

    Raises:
        serializers.ValidationError: ``{"credentials": {...}}`` naming what is missing.
    """
    problems: dict[str, list[str]] = {}
    api_id = given.get("api_id")
    if isinstance(api_id, bool) or not str(api_id or "").strip().isdigit():
        problems["api_id"] = ["required: your app's api_id (a whole number)"]
    if not isinstance(given.get("api_hash"), str) or not given["api_hash"].strip():
        problems["api_hash"] = ["required: your app's api_hash"]
    if not any(
        isinstance(given.get(k), str) and given[k].strip() for k in ("session", "bot_token")
    ):
        problems["session"] = ["required: a telethon StringSession, or give bot_token"]
    elif isinstance(given.get("session"), str) and given["session"].strip():
        try:
            tg_adapter.session_from(given["session"].strip())
        except SourceError as exc:
            problems["session"] = [exc.reason]
    if problems:
        raise serializers.ValidationError({"credentials": problems})


class AuthorSerializer(serializers.Serializer[Event]):
    id = serializers.CharField(source="author_id")
    handle = serializers.CharField(source="author_handle")
    name = serializers.CharField(source="author_name")
    followers = serializers.IntegerField(source="author_followers", allow_null=True)


class EventListSerializer(serializers.ListSerializer[Event]):
    """A page of events; for a search (``q`` in the request), the page's highlights are
    computed here, for its rows only, in one query (``SearchBackend.highlights``)."""

    def to_representation(self, data: Any) -> list[dict[str, Any]]:
        rows = list(data.all() if hasattr(data, "all") else data)
        request = self.context.get("request")
        raw = request.query_params.get("q", "") if request is not None else ""
        if raw.strip() and rows:
            try:
                query = search.parse(raw)
            except search.SearchSyntaxError:
                query = None  # refused by the filter already; nothing to mark
            if query is not None:
                ids = [row.id for row in rows]
                # The child reads the root's context: its dict, shared by every row.
                context = cast(dict[str, Any], self.context)
                context["highlights"] = search.backend().highlights(ids, query)
        return [self.child.to_representation(row) for row in rows]  # type: ignore[union-attr]


class EventSerializer(serializers.ModelSerializer[Event]):
    """An event. ``highlight``: in a search's results, the text HTML-escaped with the
    matches in ``<mark>…</mark>``; null otherwise."""

    author = AuthorSerializer(source="*", read_only=True)
    highlight = serializers.SerializerMethodField()

    @extend_schema_field({"type": "string", "nullable": True})
    def get_highlight(self, event: Event) -> str | None:
        highlights: dict[int, str] = self.context.get("highlights", {})
        return highlights.get(event.id)

    class Meta:
        model = Event
        # The same fields as an export's (``GET /api/events/export/``), and a search's
        # highlight.
        fields = [*EVENT_FIELDS, "highlight"]
        read_only_fields = fields
        list_serializer_class = EventListSerializer


_FRAME_FILE = re.compile(r'File "([^"]+)"')


def _frame_file(match: re.Match[str]) -> str:
    path = match.group(1)
    _, sep, inside = path.rpartition("site-packages/")
    if sep:
        return f'File "{inside}"'
    parts = PurePath(path).parts
    # The project's own modules by their package path (ingest/persistence.py), others
    # by their file name.
    for index, part in enumerate(parts):
        if part in PROJECT_PACKAGES:
            return f'File "{PurePath(*parts[index:])}"'
    return f'File "{PurePath(path).name}"'


PROJECT_PACKAGES = ("twiscope", "teams", "ingest", "mlengine", "alerts", "dashboard")


class DeadLetterSerializer(serializers.ModelSerializer[DeadLetter]):
    """A dead letter. No server path is shown: ``error``'s frames name files by their
    package path, and a replay row's ``payload.path`` is the archive's file name."""

    def to_representation(self, instance: DeadLetter) -> dict[str, Any]:
        data: dict[str, Any] = super().to_representation(instance)
        if isinstance(data.get("error"), str):
            data["error"] = _FRAME_FILE.sub(_frame_file, data["error"])
        payload = data.get("payload")
        if isinstance(payload, dict) and isinstance(payload.get("path"), str):
            data["payload"] = {**payload, "path": PurePath(payload["path"]).name}
        return data

    class Meta:
        model = DeadLetter
        fields = [
            "id",
            "stage",
            "source",
            "reason",
            "error",
            "attempts",
            "payload",
            "created_at",
            "requeued_at",
            "requeues",
        ]
        read_only_fields = fields


class WebhookAuthorSerializer(serializers.Serializer[Any]):
    id = serializers.CharField(required=False)
    handle = serializers.CharField(required=False, max_length=128)
    name = serializers.CharField(required=False, max_length=256)
    followers = serializers.IntegerField(
        required=False, min_value=0, max_value=2**31 - 1, allow_null=True
    )


class WebhookEnvelopeSerializer(serializers.Serializer[Any]):
    """The envelope's JSON shape (``ingest.envelope.Envelope.to_json``), for the schema:
    the webhook validates items with ``Envelope.from_json``."""

    external_id = serializers.CharField(max_length=128, help_text="Unique within the source.")
    created_at = serializers.DateTimeField(
        help_text="Event time, ISO 8601 with a UTC offset; from 1900 to EVENT_MAX_FUTURE_S "
        "(default 86400) seconds after now, else a field error on created_at."
    )
    text = serializers.CharField(required=False, allow_blank=True)
    author = WebhookAuthorSerializer(required=False)
    lang = serializers.CharField(required=False, max_length=16)
    url = serializers.CharField(required=False, max_length=2000)
    reply_to = serializers.CharField(required=False)
    repost_of = serializers.CharField(required=False)
    quote_of = serializers.CharField(required=False)
    metrics = serializers.DictField(
        child=serializers.IntegerField(min_value=0, max_value=2**63 - 1), required=False
    )
    raw = serializers.DictField(required=False)


class WebhookDeliverySerializer(serializers.Serializer[Any]):
    accepted = serializers.IntegerField(help_text="Items staged for storage.")
    duplicates = serializers.IntegerField(
        help_text="Items whose external_id the source already has, or that repeat one."
    )

    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        # Declared here: an ``errors`` attribute would hide ``Serializer.errors``.
        fields = super().get_fields()
        fields["errors"] = serializers.DictField(
            child=serializers.DictField(child=serializers.ListField(child=serializers.CharField())),
            help_text="Refused items' field errors, by the item's index in the batch.",
        )
        return fields
