"""The full-text search column of events (``ingest.search``).

Nullable, with no default: adding it rewrites nothing, whatever the table's size.
Events already enriched get their vector from ``manage.py backfill_search``."""

import django.contrib.postgres.search
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("ingest", "0010_staged_batch"),
    ]

    operations = [
        migrations.AddField(
            model_name="event",
            name="search_vector",
            field=django.contrib.postgres.search.SearchVectorField(
                blank=True,
                editable=False,
                help_text="Full-text search: the text under the `simple` configuration, then "
                "under its language's (ingest.search); set by the enrich stage, null until then.",
                null=True,
            ),
        ),
    ]
