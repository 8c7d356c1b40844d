"""``manage.py tokens``: list and revoke users' API tokens without a shell.

- ``tokens list [USERNAME]``: one line per token (id, user, name, prefix, created,
  expires, last used), every user's without a name; never a secret (none is stored).
- ``tokens revoke ID [ID ...]``: revoke tokens by id (as listed); open WebSockets
  opened with them close. An unknown id is an error, after the known ones are revoked.

New tokens: ``manage.py create_user USERNAME --team SLUG --token-name NAME``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from teams import services
from teams.models import ApiToken


def _when(value: datetime | None, never: str) -> str:
    return value.isoformat(timespec="seconds") if value is not None else never


class Command(BaseCommand):
    help = "List (tokens list [USERNAME]) or revoke (tokens revoke ID...) API tokens."

    def add_arguments(self, parser: CommandParser) -> None:
        commands = parser.add_subparsers(dest="command", required=True)
        listing = commands.add_parser("list", help="list tokens, of one user or all")
        listing.add_argument("username", nargs="?", default=None)
        revoking = commands.add_parser("revoke", help="revoke tokens by id")
        revoking.add_argument("ids", nargs="+", type=int, metavar="ID")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["command"] == "list":
            self._list(options["username"])
        else:
            self._revoke(options["ids"])

    def _list(self, username: str | None) -> None:
        tokens = ApiToken.objects.select_related("user").order_by("user__username", "id")
        if username is not None:
            tokens = tokens.filter(user__username=username)
        self.stdout.write("id\tuser\tname\tprefix\tcreated\texpires\tlast used")
        for token in tokens:
            self.stdout.write(
                "\t".join(
                    [
                        str(token.id),
                        token.user.get_username(),
                        token.name,
                        f"{token.token_key}…",
                        _when(token.created, "-"),
                        _when(token.expiry, "never"),
                        _when(token.last_used_at, "never"),
                    ]
                )
            )

    def _revoke(self, ids: list[int]) -> None:
        found = {token.id: token for token in ApiToken.objects.filter(id__in=ids)}
        for token_id in ids:
            token = found.get(token_id)
            if token is not None:
                services.revoke_token(token)
                self.stdout.write(f"revoked token {token_id} ({token.name})")
        missing = [str(i) for i in ids if i not in found]
        if missing:
            raise CommandError(f"no token with id {', '.join(missing)}")
