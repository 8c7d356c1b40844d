"""``manage.py create_user USERNAME --team SLUG``: onboard a user without a shell.

Creates (or reuses) the user, puts them in the team with a role and, with
``--token-name NAME`` or when the user has no API token yet (then named ``default``),
creates an API token and prints its secret: the **last line of stdout is then the token
alone**, so a script can take it with ``| tail -n 1``. Tokens are hashed at rest, so a
secret is printed once, when made: running the command again without ``--token-name``
changes nothing and prints no token. List and revoke a user's tokens with
``manage.py tokens``. A new user has no password (the API works with the token); set
one for the dashboard with ``manage.py changepassword USERNAME``.

Its output is those lines only: the log records of the work it does (``teams.
user_created`` and the like, INFO) are silenced while it runs; warnings and errors still
show, and ``--verbosity 2`` shows everything.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from teams import services


class Command(BaseCommand):
    help = (
        "Create (or reuse) a user and put them in a team; create an API token (with "
        "--token-name, or the user's first) and print it (the last line of output)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--team", required=True, metavar="SLUG", help="the team's slug")
        parser.add_argument(
            "--role",
            choices=services.ROLES,
            default=None,
            help="owner (manages sources and rules) or member (reads); default: member "
            "for a new membership, unchanged for an existing one",
        )
        parser.add_argument("--email", default=None, help="set the user's email address")
        parser.add_argument(
            "--create-team",
            metavar="NAME",
            default=None,
            help="create the team SLUG with this display name if it does not exist",
        )
        parser.add_argument(
            "--token-name",
            metavar="NAME",
            default=None,
            help="create a new API token with this name and print it (last line); "
            "without it, a token named 'default' is made only for a user with none",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        quiet = _info_logs_off() if options["verbosity"] < 2 else contextlib.nullcontext()
        try:
            with quiet:
                done = services.onboard_user(
                    username=options["username"],
                    team_slug=options["team"],
                    role=options["role"],
                    email=options["email"],
                    create_team_name=options["create_team"],
                    token_name=options["token_name"],
                )
        except services.OnboardingError as exc:
            raise CommandError(str(exc)) from exc
        name = done.user.get_username()
        team = f'team "{done.team.name}" ({done.team.slug})'
        if done.team_created:
            self.stdout.write(
                f"created {team}; it has no alert rules yet: add them in the admin "
                "(/admin/alerts/alertrule/) or through /api/rules/"
            )
        self.stdout.write(f"{'created' if done.user_created else 'found'} user {name}")
        if done.email_changed:
            self.stdout.write(f"set the email of {name}")
        if done.membership == "created":
            self.stdout.write(f"added {name} to {team} as {done.role}")
        elif done.membership == "updated":
            self.stdout.write(
                f"changed the role of {name} in {team} from {done.previous_role} to {done.role}"
            )
        else:
            self.stdout.write(f"{name} is already {done.role} in {team}")
        if not done.has_password:
            self.stdout.write(
                f"{name} has no password: set one to log in to the dashboard with "
                f"`python manage.py changepassword {name}`"
            )
        if done.token is None:
            self.stdout.write(
                f"{name} holds {done.tokens} API token(s) (`python manage.py tokens list "
                f"{name}`); pass --token-name NAME to create another"
            )
            return
        self.stdout.write(
            f'created API token "{done.token_name}", shown this once '
            "(send it as 'Authorization: Token <token>'):"
        )
        self.stdout.write(done.token)


@contextlib.contextmanager
def _info_logs_off() -> Iterator[None]:
    """No log record at INFO or below for the block (``logging.disable``, process-wide),
    then the level disabled before it."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)
