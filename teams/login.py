"""Login throttling: failed password checks counted per username and per address.

Every password login goes through ``django.contrib.auth.authenticate`` (the dashboard's
login page, the admin's), so the throttle lives there, once:

- ``user_login_failed`` (``count_failure``) counts a failure against the username
  (case-folded) and the client's address, each in a fixed window in Redis
  (``twiscope.ratelimit``), with ``LOGIN_RATE_USERNAME`` and ``LOGIN_RATE_IP``;
- ``ThrottledModelBackend`` (``AUTHENTICATION_BACKENDS``) refuses to check a password
  while either count has reached its limit: it raises ``PermissionDenied``, which ends
  ``authenticate`` with no user, even for the right password, until the window ends;
- a successful login clears its username's count (not the address's).

``ThrottledLoginView`` is the dashboard's login page: a refused attempt answers 429 with
``Retry-After`` and says so on the form. The admin's login page is refused the same way
and shows its usual error.

The trade-off of a per-username limit: anyone can lock a user out of password login
for a window by failing on purpose. Their API tokens and open sessions keep working,
and the per-address limit is higher, so one address cannot lock many users.
"""

from __future__ import annotations

from typing import Any, Final

import structlog
from django.conf import settings
from django.contrib.auth import user_logged_in, user_login_failed
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.views import LoginView
from django.core.exceptions import PermissionDenied
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from twiscope import ratelimit

log = structlog.get_logger(__name__)

_REFUSED_ATTR: Final = "_login_refused_for_s"


def client_address(request: HttpRequest | None) -> str:
    """The client's address as the API's throttle sees it (``TRUSTED_PROXY_HOPS``
    decides whether ``X-Forwarded-For`` is believed); ``""`` without a request."""
    if request is None:
        return ""
    return BaseThrottle().get_ident(Request(request)) or ""


def _counters(username: str, request: HttpRequest | None) -> list[tuple[str, ratelimit.Rate]]:
    counters = [
        (f"login:user:{username.casefold()}", ratelimit.parse_rate(settings.LOGIN_RATE_USERNAME))
    ]
    address = client_address(request)
    if address:
        counters.append((f"login:ip:{address}", ratelimit.parse_rate(settings.LOGIN_RATE_IP)))
    return counters


def refused_for(username: str, request: HttpRequest | None) -> int | None:
    """Seconds until a login as ``username`` from ``request``'s address may be tried
    again, or None when it may be tried now. One Redis ``GET`` per counter."""
    waits = [
        window.reset_s
        for name, rate in _counters(username, request)
        if (window := ratelimit.peek(name, rate)).count >= rate.limit
    ]
    return max(waits) if waits else None


class ThrottledModelBackend(ModelBackend):
    """Django's ``ModelBackend``, refusing to check a password while the username or
    the address is over its failure limit.

    Raises:
        PermissionDenied: the attempt is throttled (``authenticate`` then returns None
            and fires ``user_login_failed``); the wait is kept on the request for
            ``ThrottledLoginView``.
    """

    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> Any:
        if username is not None:
            wait = refused_for(username, request)
            if wait is not None:
                log.warning(
                    "teams.login_throttled", address=client_address(request), retry_after_s=wait
                )
                if request is not None:
                    setattr(request, _REFUSED_ATTR, wait)
                raise PermissionDenied("too many failed logins")
        return super().authenticate(request, username=username, password=password, **kwargs)


@receiver(user_login_failed, dispatch_uid="teams.login.count_failure")
def count_failure(
    sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **kwargs: Any
) -> None:
    """Count a failed login against its username and address (``user_login_failed``)."""
    username = credentials.get("username")
    if not isinstance(username, str):
        return
    for name, rate in _counters(username, request):
        ratelimit.hit(name, rate)


@receiver(user_logged_in, dispatch_uid="teams.login.clear_failures")
def clear_failures(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    """A successful login clears its username's failures (``user_logged_in``)."""
    name, rate = _counters(user.get_username(), None)[0]
    ratelimit.clear(name, rate)


class ThrottledLoginView(LoginView):
    """The dashboard's login page: a throttled attempt answers 429 with ``Retry-After``
    and a form error saying when to try again."""

    def form_invalid(self, form: Any) -> HttpResponse:
        wait: int | None = getattr(self.request, _REFUSED_ATTR, None)
        if wait is None:
            return super().form_invalid(form)
        form.errors.clear()
        minutes = max(1, round(wait / 60))
        form.add_error(None, f"Too many failed logins. Try again in about {minutes} minute(s).")
        response = self.render_to_response(self.get_context_data(form=form), status=429)
        response["Retry-After"] = str(wait)
        return response
