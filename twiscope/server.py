"""Limits on the request line, answered with a status instead of a dropped connection.

Two layers, both installed by ``twiscope/asgi.py``, so every way of serving the app
with daphne (``make run``'s and docker-compose's ``daphne … twiscope.asgi:application``,
``manage.py runserver``) has them without a different command line:

- ``RequestTargetLimit``: ASGI middleware answering ``414 URI Too Long`` (DRF's error
  shape, ``{"detail": …}``) to an HTTP request whose target (path and query string, as
  sent) is longer than ``MAX_REQUEST_TARGET_BYTES`` (8 KiB), before Django sees it.
- ``answer_overlong_lines()``: Twisted's HTTP server, under daphne, drops the connection
  without a word when a request line or a header line is longer than
  ``HTTPChannel.MAX_LENGTH`` (16 KiB; ``basic.LineReceiver.lineLengthExceeded``). This
  makes it answer ``414 URI Too Long`` (the request line) or ``431 Request Header Fields
  Too Large`` (a header line), then close gracefully.

A request whose request line and headers together pass Twisted's ``totalHeadersSize``
(16 KiB) while each line is shorter still gets Twisted's own ``400 Bad Request``: a URL
over 8 KiB is already refused by the middleware, so that takes over 8 KiB of headers.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

MAX_REQUEST_TARGET_BYTES = 8192
"""The longest request target (path and ``?query``, in bytes as sent) Twiscope serves."""

LINGER_S = 5
"""Seconds an answered over-long request's connection keeps reading (and discarding)
what the client still sends, so closing does not reset the connection before the client
has read the answer (RFC 9112, section 9.6)."""


def request_target_bytes(scope: dict[str, Any]) -> int:
    """The length of an HTTP scope's request target: raw path, ``?`` and query string."""
    raw_path = scope.get("raw_path") or quote(scope.get("path", "")).encode("ascii")
    query = scope.get("query_string") or b""
    return len(raw_path) + (len(query) + 1 if query else 0)


class RequestTargetLimit:
    """ASGI middleware: ``414 URI Too Long`` for an HTTP request target over
    ``MAX_REQUEST_TARGET_BYTES``; other scopes pass through untouched."""

    def __init__(self, inner: Any, limit: int = MAX_REQUEST_TARGET_BYTES) -> None:
        self.inner = inner
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] != "http" or request_target_bytes(scope) <= self.limit:
            return await self.inner(scope, receive, send)
        body = json.dumps(
            {"detail": f"Request URI too long: the limit is {self.limit} bytes."}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 414,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return None


_STATUS_LINES = {
    True: b"414 URI Too Long",
    False: b"431 Request Header Fields Too Large",
}


def _answer_overlong_line(channel: Any, line: bytes) -> None:
    """``HTTPChannel.lineLengthExceeded``: answer 414 (request line) or 431 (a header
    line), stop parsing, half-close and discard the rest of the request."""
    # HTTPChannel.lineReceived adds each line's length to _receivedHeaderSize and
    # resets it to 0 between requests: 0 here means no line of this request yet.
    request_line = channel._receivedHeaderSize == 0
    status = _STATUS_LINES[request_line]
    body = status[4:] + b"\n"
    channel.transport.write(
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )
    channel.dataReceived = lambda data: None
    channel.setTimeout(LINGER_S)
    lose_write = getattr(channel.transport, "loseWriteConnection", None)
    if lose_write is not None:
        lose_write()  # FIN after the answer; the client's close or the timeout ends it
    else:
        channel.loseConnection()


def answer_overlong_lines() -> None:
    """Make Twisted's HTTP server (under daphne) answer an over-long request or header
    line with 414 or 431 instead of dropping the connection. Idempotent.

    daphne builds Twisted's own ``HTTPChannel`` (``twisted.web.http.HTTPFactory``), so the
    method is set on that class; it has no ``lineLengthExceeded`` of its own (it
    inherits ``LineReceiver``'s, which only drops the connection).
    """
    from twisted.web.http import HTTPChannel

    HTTPChannel.lineLengthExceeded = _answer_overlong_line  # type: ignore[method-assign]
