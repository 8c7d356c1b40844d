"""Fetching a URL a user gave, without letting it reach inside the network (SSRF).

A feed URL is the user's choice, and the platform fetches it from inside the
deployment: ``http://127.0.0.1:6379/``, ``http://169.254.169.254/`` (a cloud's metadata
service) or a private address would let a user probe what only the platform can reach
(OWASP, "Server Side Request Forgery Prevention Cheat Sheet"). So every address the
host name resolves to must be a global one, and every redirect is followed by hand and
checked the same way. ``settings.SOURCES_ALLOW_PRIVATE_URLS`` lifts the check (on
under ``make run``, for feeds served on the developer's own machine).

The check resolves the name just before the request; a name whose DNS answer changes
in between (DNS rebinding) is not caught.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
from django.conf import settings

MAX_REDIRECTS = 5
MAX_BYTES = 10 * 1024 * 1024
"""The largest document fetched (bytes); a larger one is cut off and refused."""
TIMEOUT_S = (5.0, 20.0)
"""Connect and read timeouts, seconds."""
USER_AGENT = "Twiscope/1.0 (+https://github.com/twiscope; feed reader)"


class UnsafeURL(ValueError):
    """The URL is not http(s), has no host, or its host resolves to a loopback,
    private, link-local or otherwise non-global address."""


def check_url(url: str, *, allow_private: bool | None = None) -> None:
    """Refuse ``url`` unless it is http(s) and its host resolves only to global
    addresses (``allow_private``, default ``settings.SOURCES_ALLOW_PRIVATE_URLS``,
    skips the address check).

    Raises:
        UnsafeURL: the reason, fit for a 400 or a source's last error.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL("only http and https URLs are fetched")
    if not parts.hostname:
        raise UnsafeURL("the URL has no host")
    if settings.SOURCES_ALLOW_PRIVATE_URLS if allow_private is None else allow_private:
        return
    try:
        answers = socket.getaddrinfo(parts.hostname, parts.port or None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeURL(f"the host {parts.hostname!r} does not resolve: {exc}") from None
    for *_, sockaddr in answers:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if not address.is_global:
            raise UnsafeURL(
                f"the host {parts.hostname!r} resolves to {address}, a loopback, private "
                "or link-local address: refused"
            )


@dataclass(frozen=True, slots=True)
class Fetched:
    """A response: ``status`` (200 or 304), ``body`` bytes, ``headers`` (lower-case
    names), ``url`` (after redirects)."""

    status: int
    body: bytes
    headers: dict[str, str]
    url: str


def fetch(url: str, *, headers: dict[str, str] | None = None) -> Fetched:
    """GET ``url`` with ``headers``, following up to ``MAX_REDIRECTS`` redirects, each
    checked by ``check_url``; at most ``MAX_BYTES``.

    Returns the final response when it is 200 or 304.

    Raises:
        UnsafeURL: the URL or a redirect target is refused.
        requests.HTTPError: any other status (``.response`` carries it).
        requests.RequestException: a connection failure or timeout.
        ValueError: the body is over ``MAX_BYTES``.
    """
    sent = {"User-Agent": USER_AGENT, **(headers or {})}
    with requests.Session() as session:
        for _ in range(MAX_REDIRECTS + 1):
            check_url(url)
            response = session.get(
                url, headers=sent, timeout=TIMEOUT_S, allow_redirects=False, stream=True
            )
            with response:
                if response.is_redirect and response.headers.get("location"):
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code not in (200, 304):
                    response.raise_for_status()
                    raise requests.HTTPError(
                        f"{response.status_code} from {url}", response=response
                    )
                body = b""
                for chunk in response.iter_content(64 * 1024):
                    body += chunk
                    if len(body) > MAX_BYTES:
                        raise ValueError(f"the document is over {MAX_BYTES} bytes")
                names = {k.lower(): v for k, v in response.headers.items()}
                return Fetched(response.status_code, body, names, url)
    raise requests.TooManyRedirects(f"more than {MAX_REDIRECTS} redirects from {url}")
