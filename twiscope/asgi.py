"""ASGI entry point: HTTP through Django, WebSockets through Channels.

Also puts the request-line limits of ``twiscope/server.py`` in place: a request target
over 8 KiB answers 414 here, and Twisted's HTTP server (daphne's) answers 414/431
instead of dropping a connection whose request or header line passes 16 KiB.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twiscope.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from alerts.routing import websocket_urlpatterns  # noqa: E402
from teams.ws_auth import TokenOrSessionAuthMiddleware  # noqa: E402
from twiscope.server import RequestTargetLimit, answer_overlong_lines  # noqa: E402

# daphne imports this module before it builds its HTTP factory, so the server-level
# answer is in place for every connection it accepts.
answer_overlong_lines()

application = ProtocolTypeRouter(
    {
        "http": RequestTargetLimit(django_asgi_app),
        # Token-authenticated sockets may come from any client; session-authenticated
        # ones must come from an allowed origin (see teams/ws_auth.py).
        "websocket": TokenOrSessionAuthMiddleware(URLRouter(websocket_urlpatterns)),
    }
)
