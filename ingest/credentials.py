"""Source credentials, encrypted at rest with Fernet (the ``cryptography`` package).

A source's credentials (API tokens, session strings, webhook signing secrets) are a
JSON object sealed into one Fernet token (AES-128-CBC with HMAC-SHA256, with a
timestamp; https://github.com/fernet/spec) and stored in ``Source.credentials``. The
keys come from ``settings.CREDENTIAL_KEYS`` (``TWISCOPE_CREDENTIAL_KEYS``, newest
first) through ``MultiFernet``: the first key encrypts, every key decrypts, and
``rotate`` re-seals a token under the first key. Outside production, with no key set,
one key is derived from ``SECRET_KEY`` (HKDF-SHA256), so a development platform works
without setup; ``make run`` sets a generated key anyway.

Credentials are write-only: the API never returns them, the admin never shows them,
and nothing here logs them.
"""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


class CredentialsError(Exception):
    """Stored credentials could not be decrypted: no configured key opens them (a key
    was removed from ``TWISCOPE_CREDENTIAL_KEYS``) or the token was altered."""


def _fernet() -> MultiFernet:
    keys = [key.strip() for key in settings.CREDENTIAL_KEYS if key.strip()]
    if not keys:
        derived = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"twiscope credentials"
        ).derive(settings.SECRET_KEY.encode())
        keys = [base64.urlsafe_b64encode(derived).decode()]
    try:
        return MultiFernet([Fernet(key) for key in keys])
    except ValueError as exc:
        raise ImproperlyConfigured(
            "TWISCOPE_CREDENTIAL_KEYS: each key must be 32 url-safe base64-encoded bytes "
            "(Fernet.generate_key())"
        ) from exc


def new_secret() -> str:
    """A fresh signing secret: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def seal(credentials: dict[str, Any]) -> str:
    """``credentials`` (a JSON-safe dict) as a Fernet token under the newest key; ``""``
    for an empty dict."""
    if not credentials:
        return ""
    return _fernet().encrypt(json.dumps(credentials, sort_keys=True).encode()).decode()


def unseal(token: str) -> dict[str, Any]:
    """The dict ``seal`` sealed into ``token``; ``{}`` for ``""``.

    Raises:
        CredentialsError: no configured key opens the token, or it was altered.
    """
    if not token:
        return {}
    try:
        value = json.loads(_fernet().decrypt(token.encode()))
    except InvalidToken as exc:
        raise CredentialsError("no configured credential key opens these credentials") from exc
    return value if isinstance(value, dict) else {}


def rotate(token: str) -> str:
    """``token`` re-encrypted under the newest key (``""`` stays ``""``).

    Raises:
        CredentialsError: as ``unseal``.
    """
    if not token:
        return ""
    try:
        return _fernet().rotate(token.encode()).decode()
    except InvalidToken as exc:
        raise CredentialsError("no configured credential key opens these credentials") from exc
