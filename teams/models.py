"""Who may see what: teams and their members.

Every source, rule and alert belongs to one team; API querysets and WebSocket groups
are scoped to the teams the caller is a member of. This app imports no other project
app: every other app builds on it.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models

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
