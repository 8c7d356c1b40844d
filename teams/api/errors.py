"""Every error under ``/api/`` in JSON, DRF's shape: ``{"detail": "<message>"}``.

DRF answers its own views' errors in JSON, but Django answers what happens outside
them in HTML: a URL that matches no route (``/api/nope/``, ``/api/ingest/webhooks/abc/``),
a body over ``DATA_UPLOAD_MAX_MEMORY_SIZE`` or a bad ``Host`` (400), and an exception
no view handled (500, Django's ``handler500``, or the debug page). Under ``/api/``,
``ApiJsonErrorsMiddleware`` replaces such a response (status ≥ 400, not JSON, not
streamed) by ``{"detail": …}`` with the same status and the headers a client acts on
(``Allow``, ``Retry-After``, ``WWW-Authenticate``). Outside ``/api/`` (the dashboard,
the admin) nothing changes. Named in ``MIDDLEWARE`` right after the outage middleware, so
it sees what every later middleware answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase, JsonResponse

API_PREFIX = "/api/"
KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")
"""Headers of the replaced response that the JSON one keeps."""
MESSAGES = {
    400: "Bad request.",
    404: "Not found.",
    405: "Method not allowed.",
    500: "A server error occurred.",
}
"""DRF's own wording where it has one; other statuses say their reason phrase."""


def json_error(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
    """``response`` itself, or its JSON replacement when it is an error of an ``/api/``
    path that is not JSON already (module docstring). Never raises."""
    if (
        response.status_code < 400
        or not request.path.startswith(API_PREFIX)
        or response.streaming
        or "json" in response.get("Content-Type", "")
    ):
        return response
    status = response.status_code
    try:
        message = MESSAGES.get(status) or HTTPStatus(status).phrase + "."
    except ValueError:
        message = "Error."
    if status == 405:
        message = f'Method "{request.method}" not allowed.'
    replaced = JsonResponse({"detail": message}, status=status)
    for header in KEPT_HEADERS:
        if header in response:
            replaced[header] = response[header]
    return replaced


class ApiJsonErrorsMiddleware:
    """Django middleware (sync and async): errors under ``/api/`` in JSON (module
    docstring)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.is_async:
            return self.__acall__(request)
        return json_error(request, self.get_response(request))

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = await self.get_response(request)
        return json_error(request, response)
