"""The GIN index of ``Event.search_vector``, built CONCURRENTLY.

A plain CREATE INDEX holds a SHARE lock on the events table for the whole build, so
ingest and enrichment would stop writing for as long as it takes (minutes on millions of
rows). CONCURRENTLY lets writes go on; it cannot run inside a transaction, hence a
non-atomic migration holding this one operation. Should the build fail midway it leaves
an INVALID index: drop it (``DROP INDEX CONCURRENTLY event_search``) and migrate again.
"""

import django.contrib.postgres.indexes
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("ingest", "0011_event_search_vector"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="event",
            index=django.contrib.postgres.indexes.GinIndex(
                fields=["search_vector"], name="event_search"
            ),
        ),
    ]
