"""``manage.py bootstrap_demo``: the demo team, user, API token and default rule.

Idempotent. The password is generated once and kept in ``.run/demo-password`` (mode
0600), and set only when the user is created (or has no usable password): a restart
never re-hashes it, so the analyst's open dashboards stay logged in and a password
changed with ``manage.py changepassword`` stays changed. The API token (named
``DEMO_TOKEN_NAME``) is written to ``.run/api-token`` (mode 0600): tokens are hashed at
rest, so the file is its only copy; it is kept while the token it holds still opens
the API, else a new token replaces it (and the user's earlier tokens of that name are
revoked). The last line of stdout is JSON: ``{"username", "password",
"token", "team"}``; ``password`` is null when the kept one no longer opens the account.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import check_password
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

from alerts.services import ensure_default_rule
from teams import services as team_services
from teams.models import DEMO_TEAM_SLUG, ApiToken, Membership, Team

DEMO_TOKEN_NAME = "demo (make run)"
"""The name of the demo user's API token, the one in ``.run/api-token``."""


def _secret_file(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(12)
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value


class Command(BaseCommand):
    help = (
        "Create the demo team, user, API token and default alert rule where missing; "
        "the user's password is set only when the user is created."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default="demo")
        parser.add_argument("--run-dir", default=str(settings.BASE_DIR / ".run"))

    def handle(self, *args: Any, **options: Any) -> None:
        run_dir = Path(options["run_dir"])
        password = _secret_file(run_dir / "demo-password")
        with transaction.atomic():
            team, _ = Team.objects.get_or_create(slug=DEMO_TEAM_SLUG, defaults={"name": "Demo"})
            user, created = get_user_model().objects.get_or_create(username=options["username"])
            if created or not user.has_usable_password():
                user.set_password(password)
                user.save(update_fields=["password"])
            Membership.objects.update_or_create(
                user=user, team=team, defaults={"role": Membership.Role.OWNER}
            )
            ensure_default_rule(team)
            token_file = run_dir / "api-token"
            key = token_file.read_text().strip() if token_file.exists() else ""
            held = team_services.authenticate_token(key) if key else None
            if held is None or held.user_id != user.pk:
                for stale in ApiToken.objects.filter(user=user, name=DEMO_TOKEN_NAME):
                    team_services.revoke_token(stale)
                _token, key = team_services.create_token(user=user, name=DEMO_TOKEN_NAME)
        token_file.write_text(key + "\n")
        token_file.chmod(0o600)
        self.stdout.write(
            json.dumps(
                {
                    "username": user.username,
                    # The hashers' check_password, not the user's: it never re-hashes.
                    "password": password if check_password(password, user.password) else None,
                    "token": key,
                    "team": team.slug,
                }
            )
        )
