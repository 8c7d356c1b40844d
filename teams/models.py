"""Who may see what: teams, their members, and the API tokens users hold.

Every source, rule and alert belongs to one team; API querysets and WebSocket groups
are scoped to the teams the caller is a member of. This app imports no other project
app: every other app builds on it.
"""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.db import models
from knox.models import AbstractAuthToken
from knox.settings import CONSTANTS

DEMO_TEAM_SLUG = "demo"
"""The team ``make run`` creates (``manage.py bootstrap_demo``). A command that takes a
team (``manage.py replay``) falls back to it when there are several."""


class Team(models.Model):
    """A group of analysts sharing sources, alert rules and alerts."""

    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=50, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    """A user's role in a team: owners manage sources and rules, members read."""

    class Role(models.TextChoices):
        OWNER = "owner"
        MEMBER = "member"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "team"], name="membership_unique")]

    def __str__(self) -> str:
        return f"{self.user} in {self.team} ({self.role})"


class ApiToken(AbstractAuthToken):
    """A user's named API token, hashed at rest (django-rest-knox's model, swapped in by
    ``KNOX_TOKEN_MODEL``).

    Stored: ``digest``, the SHA-512 hex of the whole token (the secret is never
    stored, and shown once, when created); ``token_key``, its first 15 characters, the
    index a presented token is looked up by (and the prefix the owner sees to tell
    tokens apart); ``expiry`` (None: never); ``last_used_at``, written at most once per
    ``API_TOKEN_LAST_USED_EVERY_S`` (``teams.services.authenticate_token``). Revoking
    a token deletes its row. The id replaces knox's digest as the primary key, so
    URLs and the admin name a token by a number, not by its hash.
    """

    id = models.BigAutoField(primary_key=True)
    digest = models.CharField(max_length=CONSTANTS.DIGEST_LENGTH, unique=True)
    name = models.CharField(max_length=100)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created", "-id"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.token_key}…)"

    def is_expired(self, now: datetime) -> bool:
        """Whether the token has an expiry at or before ``now``."""
        return self.expiry is not None and self.expiry <= now
