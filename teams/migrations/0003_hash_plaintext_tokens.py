"""Carry Django REST framework's plaintext tokens (``authtoken_token``) into
``teams.ApiToken``, hashed, then empty the old table.

A client holding an old 40-character key keeps working: its row here has the digest
django-rest-knox computes for it (SHA-512 of the key's UTF-8 bytes, hex; the
``REST_KNOX`` setting pins the algorithm) and its first 15 characters as the lookup
prefix, the user and the creation time of the old row, and the name ``"API token
(before hashing)"``. The old rows are deleted: the database no longer holds a secret.
``rest_framework.authtoken`` is no longer installed, so its table is read with SQL
when it exists (a database created before this change); a new database has none and
nothing is done. Not reversible: a digest gives no key back.
"""

from __future__ import annotations

import hashlib
from typing import Any

from django.db import migrations

OLD_TABLE = "authtoken_token"
MIGRATED_NAME = "API token (before hashing)"
KEY_PREFIX_CHARS = 15
"""django-rest-knox's ``CONSTANTS.TOKEN_KEY_LENGTH``, frozen here as this migration ran."""


def hash_plaintext_tokens(apps: Any, schema_editor: Any) -> int:
    """Copy every row of ``authtoken_token`` into ``teams_apitoken``, hashed, and
    delete it; returns how many were carried. Safe to run again (a key already carried
    is not duplicated)."""
    connection = schema_editor.connection
    if OLD_TABLE not in connection.introspection.table_names():
        return 0
    api_token = apps.get_model("teams", "ApiToken")
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT key, user_id, created FROM {OLD_TABLE}")  # noqa: S608
        rows = cursor.fetchall()
    carried = 0
    for key, user_id, created in rows:
        digest = hashlib.sha512(key.encode("utf-8")).hexdigest()
        token, made = api_token.objects.get_or_create(
            digest=digest,
            defaults={
                "token_key": key[:KEY_PREFIX_CHARS],
                "user_id": user_id,
                "name": MIGRATED_NAME,
                "expiry": None,
            },
        )
        if made:
            # auto_now_add stamped "now": keep the old row's creation time.
            api_token.objects.filter(pk=token.pk).update(created=created)
            carried += 1
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {OLD_TABLE}")  # noqa: S608
    return carried


class Migration(migrations.Migration):
    dependencies = [("teams", "0002_api_tokens")]

    operations = [
        migrations.RunPython(hash_plaintext_tokens, migrations.RunPython.noop, elidable=True)
    ]
