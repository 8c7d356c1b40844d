"""The wire: one try of sending an alert event to a signed webhook, Slack or email.

Each sender makes one call with a timeout and returns a ``Sent``: whether it arrived,
and if not, whether trying again could help (``alerts.delivery`` decides about
retries, records the try and keeps the channel's health). Nothing here touches the
database.

- Webhooks follow the Standard Webhooks specification
  (https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md):
  ``webhook-id``, ``webhook-timestamp`` (unix seconds) and ``webhook-signature``
  (``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, keyed with the base64
  decoded bytes of the secret after its ``whsec_`` prefix).
- Slack: an incoming webhook taking a Block Kit message
  (https://api.slack.com/messaging/webhooks); its errors come as a status and a plain
  text string (``invalid_token``, ``channel_not_found``...).
- Email: Django's email backend (``EMAIL_*`` settings, ``EMAIL_TIMEOUT``), a plain
  text and an HTML part.

Outcomes: 2xx arrived; 410 Gone is permanent and disables the channel; 408 and 429
(and Slack's ``rate_limited``) and 5xx, timeouts and connection errors are temporary;
any other 4xx, a redirect and Slack's permanent error strings are permanent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import secrets
import smtplib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import requests
from django.conf import settings
from django.core.mail import EmailMultiAlternatives, get_connection

from ingest.sources.http import UnsafeURL, check_url

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
"""Random bytes in a webhook signing secret (the spec asks for 24 to 64)."""
USER_AGENT = "Twiscope-Webhooks/1.0"
TEMPORARY_STATUSES = frozenset({408, 425, 429})
"""4xx answers that say "later", not "never": retried like 5xx."""
SLACK_PERMANENT_ERRORS = frozenset(
    {
        "invalid_token",
        "channel_not_found",
        "no_service",
        "no_service_id",
        "no_team",
        "team_disabled",
        "channel_is_archived",
        "action_prohibited",
        "posting_to_general_channel_denied",
        "user_not_found",
        "invalid_payload",
    }
)
"""Slack incoming-webhook errors that no retry fixes (Slack's "Handling errors" list)."""
SEVERITY_EMOJI = {
    "critical": ":rotating_light:",
    "warning": ":warning:",
    "info": ":information_source:",
}


@dataclass(frozen=True, slots=True)
class Sent:
    """One try's outcome: ``ok`` (arrived), ``http_status`` (None: no HTTP answer, or
    email), ``latency_ms`` (wall time of the call), ``error`` ("" when ok),
    ``permanent`` (retrying cannot help) and ``disable`` (the receiver is gone: 410)."""

    ok: bool
    http_status: int | None
    latency_ms: float
    error: str = ""
    permanent: bool = False
    disable: bool = False


def new_webhook_secret() -> str:
    """A fresh Standard Webhooks signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header of ``body`` (Standard Webhooks, symmetric
    ``v1``): ``"v1," + base64(HMAC-SHA256(key, f"{msg_id}.{timestamp}.{body}"))``, the key
    being the base64-decoded part of ``secret`` after ``whsec_``.

    Raises:
        ValueError: ``secret`` is not ``whsec_`` + base64.
    """
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a signing secret starts with whsec_")
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def event_body(event: str, alert: dict[str, Any], timestamp: float) -> bytes:
    """The JSON body of a webhook: ``{"type", "timestamp" (ISO 8601 UTC), "data"}``."""
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
    return json.dumps(
        {"type": event, "timestamp": at, "data": alert}, separators=(",", ":"), default=str
    ).encode()


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)


def _post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> Sent:
    """POST ``body`` to ``url`` (checked against SSRF first), no redirects followed;
    the HTTP outcome rules of the module docstring."""
    start = time.perf_counter()
    try:
        check_url(url)
    except UnsafeURL as exc:
        return Sent(False, None, _ms(start), str(exc), permanent=True)
    try:
        response = requests.post(
            url,
            data=body,
            headers={"content-type": "application/json", "user-agent": USER_AGENT, **headers},
            timeout=(timeout_s, timeout_s),
            allow_redirects=False,
        )
    except requests.RequestException as exc:
        return Sent(False, None, _ms(start), f"{type(exc).__name__}: {exc}"[:500])
    latency = _ms(start)
    status = response.status_code
    text = response.text[:200].strip()
    if 200 <= status < 300:
        return Sent(True, status, latency)
    error = f"HTTP {status}" + (f": {text}" if text else "")
    if status == 410:
        return Sent(False, status, latency, error, permanent=True, disable=True)
    if 300 <= status < 400:
        return Sent(False, status, latency, f"HTTP {status}: redirects are not followed", True)
    if 400 <= status < 500 and status not in TEMPORARY_STATUSES:
        return Sent(False, status, latency, error, permanent=True)
    return Sent(False, status, latency, error)


def send_webhook(
    *, url: str, secret: str, msg_id: str, event: str, alert: dict[str, Any], timeout_s: float
) -> Sent:
    """POST the alert event to ``url``, signed with ``secret`` under the message id
    ``msg_id`` (the same on every try of a delivery), timestamped now."""
    now = time.time()
    body = event_body(event, alert, now)
    timestamp = int(now)
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }
    return _post(url, body, headers, timeout_s)


def alert_url(alert: dict[str, Any]) -> str:
    """The alert on the dashboard: ``PUBLIC_BASE_URL`` + ``/alerts/<id>/``."""
    return f"{settings.PUBLIC_BASE_URL}/alerts/{alert['id']}/"


def why(alert: dict[str, Any]) -> str:
    """The why of an alert in one line: its explanation's measure, value, baseline and
    score when it has one, otherwise its evidence's summary, otherwise its rule."""
    explanation = alert.get("explanation")
    if isinstance(explanation, dict) and explanation.get("measure"):
        parts = [str(explanation["measure"])]
        if explanation.get("value") is not None:
            parts.append(f"{explanation['value']} vs {explanation.get('baseline')} expected")
        if explanation.get("score") is not None:
            parts.append(f"score {explanation['score']}")
        return " · ".join(parts)
    evidence = alert.get("evidence") or {}
    for key in ("summary", "why", "explanation"):
        if isinstance(evidence.get(key), str) and evidence[key]:
            return str(evidence[key]).splitlines()[0]
    rule = alert.get("rule") or {}
    return f"rule {rule.get('name', '')!s}".strip()


def top_post(alert: dict[str, Any]) -> str | None:
    """The text of the alert's first evidence post (explanation or evidence), or None."""
    for holder in (alert.get("explanation"), alert.get("evidence")):
        if isinstance(holder, dict):
            for key in ("evidence", "posts", "top_posts", "samples"):
                posts = holder.get(key)
                if isinstance(posts, list) and posts and isinstance(posts[0], dict):
                    text = posts[0].get("text")
                    if isinstance(text, str) and text:
                        author = posts[0].get("author")
                        return f"{text} (@{author})" if isinstance(author, str) else text
    return None


def slack_message(alerts: Sequence[dict[str, Any]], event: str = "alert.created") -> dict[str, Any]:
    """A Block Kit message: for one alert its title, severity, why, top post and link;
    for several (a digest) one section each, under a header counting them."""
    blocks: list[dict[str, Any]] = []
    if len(alerts) > 1:
        blocks.append(
            {"type": "header", "text": {"type": "plain_text", "text": f"{len(alerts)} alerts"}}
        )
    for alert in alerts:
        severity = str(alert.get("severity", "info"))
        emoji = SEVERITY_EMOJI.get(severity, "")
        verb = "updated" if event == "alert.updated" else "new"
        lines = [
            f"{emoji} *<{alert_url(alert)}|{_mrkdwn(str(alert.get('title', '')))}>*",
            f"*{severity}* · {verb} · {_mrkdwn(why(alert))}",
        ]
        post = top_post(alert)
        if post:
            lines.append("> " + _mrkdwn(post[:280]).replace("\n", " "))
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)}})
    text = str(alerts[0].get("title", "alert")) if len(alerts) == 1 else f"{len(alerts)} new alerts"
    return {"text": text, "blocks": blocks}


def _mrkdwn(text: str) -> str:
    """Escape the three characters Slack's mrkdwn reserves (&, <, >)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def send_slack(*, webhook_url: str, message: dict[str, Any], timeout_s: float) -> Sent:
    """POST ``message`` to a Slack incoming webhook; Slack's permanent error strings
    (``SLACK_PERMANENT_ERRORS``) in the answer make the failure permanent."""
    sent = _post(webhook_url, json.dumps(message).encode(), {}, timeout_s)
    if sent.ok or (sent.permanent and sent.disable):
        return sent
    code = sent.error.partition(": ")[2].strip()
    if code in SLACK_PERMANENT_ERRORS:
        return Sent(False, sent.http_status, sent.latency_ms, sent.error, permanent=True)
    if code == "rate_limited":
        return Sent(False, sent.http_status, sent.latency_ms, sent.error)
    return sent


def send_email(*, to: Sequence[str], event: str, alert: dict[str, Any], timeout_s: float) -> Sent:
    """Send the alert to ``to`` through Django's email backend (``EMAIL_*`` settings;
    ``timeout_s`` bounds each SMTP call), a plain text and an HTML part. SMTP 5xx
    refusals are permanent; connection errors, timeouts and 4xx are temporary."""
    start = time.perf_counter()
    title = str(alert.get("title", "alert"))
    severity = str(alert.get("severity", "info"))
    verb = "Updated alert" if event == "alert.updated" else "Alert"
    link, line, post = alert_url(alert), why(alert), top_post(alert)
    text = f"{verb}: {title}\nSeverity: {severity}\nWhy: {line}\n"
    text += (f"Top post: {post}\n" if post else "") + f"\n{link}\n"
    body = (
        f"<h2>{html.escape(verb)}: {html.escape(title)}</h2>"
        f"<p><strong>Severity:</strong> {html.escape(severity)}</p>"
        f"<p><strong>Why:</strong> {html.escape(line)}</p>"
        + (f"<blockquote>{html.escape(post)}</blockquote>" if post else "")
        + f'<p><a href="{html.escape(link)}">Open the alert</a></p>'
    )
    message = EmailMultiAlternatives(
        subject=f"[Twiscope {severity}] {title}"[:200],
        body=text,
        to=list(to),
        connection=get_connection(timeout=timeout_s),
    )
    message.attach_alternative(body, "text/html")
    try:
        message.send()
    except smtplib.SMTPResponseException as exc:
        error = f"SMTP {exc.smtp_code}: {exc.smtp_error!r}"[:500]
        return Sent(False, None, _ms(start), error, permanent=500 <= exc.smtp_code < 600)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        permanent = all(500 <= code < 600 for code in codes)
        return Sent(False, None, _ms(start), f"recipients refused: {exc.recipients}", permanent)
    except (smtplib.SMTPException, OSError) as exc:
        return Sent(False, None, _ms(start), f"{type(exc).__name__}: {exc}"[:500])
    return Sent(True, None, _ms(start))
