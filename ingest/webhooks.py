"""Signed webhooks: a sender posts envelopes to its webhook source, signed with the
source's secret.

Authentication is HMAC-SHA256 (RFC 2104) over ``"<timestamp>.<raw body>"`` with the
source's signing secret, the scheme of Stripe's and Slack's webhooks: the sender puts
unix seconds in ``X-Twiscope-Timestamp`` and ``sha256=<hex digest>`` in
``X-Twiscope-Signature``. A timestamp more than ``WEBHOOK_TOLERANCE_S`` from now is
refused, so a captured request cannot be replayed later.

The body is one envelope (``ingest.envelope.Envelope.to_json``'s shape) or a list of up
to ``WEBHOOK_MAX_EVENTS``. Each item is validated on its own: the valid ones are staged
(one batch, one persist task), the others reported by index with their field errors.
The 202 is sent only once the batch is committed to PostgreSQL (``StagedBatch``): an
accepted item survives the loss of Redis or of any one process.
Idempotent by ``external_id``: an id the source already stored, or one repeated in the
request, counts as a duplicate and is not staged again (an id still in flight in the
pipeline is caught when its batch is stored, by the events' unique key).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from ingest.envelope import Envelope, EnvelopeError
from ingest.models import Source
from ingest.persistence import enqueue_envelopes
from ingest.services import only_new

SIGNATURE_HEADER = "X-Twiscope-Signature"
TIMESTAMP_HEADER = "X-Twiscope-Timestamp"


class SignatureError(Exception):
    """The request is not signed by the source's secret, or not recently."""


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """The ``X-Twiscope-Signature`` value of ``body`` sent at ``timestamp`` (unix
    seconds): ``"sha256=" + hex(HMAC-SHA256(secret, "<timestamp>.<body>"))``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str | None, signature: str | None, body: bytes) -> None:
    """Check a request's signature headers against ``secret``.

    Raises:
        SignatureError: a header is missing, the timestamp is not whole unix seconds
            or is more than ``WEBHOOK_TOLERANCE_S`` from now, or the signature does not
            match (compared in constant time).
    """
    if not timestamp or not signature:
        raise SignatureError(f"{TIMESTAMP_HEADER} and {SIGNATURE_HEADER} are required")
    try:
        sent = int(timestamp)
    except ValueError:
        raise SignatureError(f"{TIMESTAMP_HEADER} must be unix seconds") from None
    if abs(time.time() - sent) > settings.WEBHOOK_TOLERANCE_S:
        raise SignatureError(
            f"{TIMESTAMP_HEADER} is more than {settings.WEBHOOK_TOLERANCE_S} s from now"
        )
    if not hmac.compare_digest(sign(secret, timestamp, body), signature.strip()):
        raise SignatureError("the signature does not match")


@dataclass(slots=True)
class Delivery:
    """What a webhook request came to: ``accepted`` items staged, ``duplicates`` items
    already stored or repeated, ``errors`` the refused items' field errors by index
    (``{"3": {"created_at": ["must carry a UTC offset"]}}``)."""

    accepted: int = 0
    duplicates: int = 0
    errors: dict[str, dict[str, list[str]]] = field(default_factory=dict)


def field_errors(exc: EnvelopeError) -> dict[str, list[str]]:
    """An ``EnvelopeError`` as DRF-style field errors: its message's ``field: reason``
    prefix names the field; otherwise the error is ``non_field_errors``."""
    message = str(exc)
    name, sep, reason = message.partition(": ")
    if sep and name and " " not in name:
        return {name: [reason]}
    return {"non_field_errors": [message]}


def deliver(source: Source, items: list[Any]) -> Delivery:
    """Validate ``items`` (decoded JSON objects), stage the valid new ones for
    ``source`` and queue their persist task. Returns the ``Delivery``.

    Side effects: one staged batch (committed before this returns) and one ingest task
    when anything is accepted.
    """
    result = Delivery()
    valid: list[Envelope] = []
    for index, item in enumerate(items):
        try:
            valid.append(Envelope.from_json(item))
        except EnvelopeError as exc:
            result.errors[str(index)] = field_errors(exc)
    fresh, result.duplicates = only_new(source, valid)
    if fresh:
        enqueue_envelopes(source=source, envelopes=fresh)
    result.accepted = len(fresh)
    return result
