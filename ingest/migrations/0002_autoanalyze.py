"""Keep planner statistics of this app's fast-growing tables fresh (see
twiscope.dbops.analyze_often)."""

from __future__ import annotations

from django.db import migrations

from twiscope.dbops import analyze_often


class Migration(migrations.Migration):
    dependencies = [("ingest", "0001_initial")]

    operations = [analyze_often("ingest_event")]
