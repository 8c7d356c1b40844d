"""The analyst's dashboard pages: templates only.

Every number on the page is read in the browser from the REST API (``/api/``) and the
``/ws/alerts/`` WebSocket; these views render the shell and hold no business logic.
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie


@login_required
@ensure_csrf_cookie
def home(request: HttpRequest) -> HttpResponse:
    """The live dashboard: event rate, pipeline health, current trends, alerts feed.

    Anonymous callers are redirected to ``settings.LOGIN_URL``. The CSRF cookie is set so
    the page's script can send ``X-CSRFToken`` on unsafe API methods.
    """
    return render(request, "dashboard/home.html")
