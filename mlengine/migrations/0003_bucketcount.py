"""Term counts: one row per event-time bucket (``BucketCount``) instead of one per term
and bucket (``TermCount``). The counts already kept are carried over."""

from __future__ import annotations

import django.contrib.postgres.fields
import django.db.models.deletion
from django.db import migrations, models

from twiscope.dbops import analyze_often

COPY_COUNTS = """
INSERT INTO mlengine_bucketcount (source_id, bucket_start, events, authors, terms)
SELECT b.source_id, b.bucket_start,
       COALESCE(total.events, 0), COALESCE(total.authors, '{}'),
       COALESCE(
           (SELECT jsonb_object_agg(c.term, jsonb_build_array(c.events, to_jsonb(c.authors)))
            FROM mlengine_termcount c
            WHERE c.source_id = b.source_id AND c.bucket_start = b.bucket_start
              AND c.term <> '*'),
           '{}'::jsonb)
FROM (SELECT DISTINCT source_id, bucket_start FROM mlengine_termcount) b
LEFT JOIN mlengine_termcount total
  ON total.source_id = b.source_id AND total.bucket_start = b.bucket_start
 AND total.term = '*'
"""


class Migration(migrations.Migration):
    dependencies = [
        ("ingest", "0001_initial"),
        ("mlengine", "0002_autoanalyze"),
    ]

    operations = [
        migrations.CreateModel(
            name="BucketCount",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("bucket_start", models.DateTimeField()),
                ("events", models.IntegerField(default=0)),
                (
                    "authors",
                    django.contrib.postgres.fields.ArrayField(
                        base_field=models.CharField(max_length=128), default=list, size=None
                    ),
                ),
                ("terms", models.JSONField(default=dict)),
                (
                    "source",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to="ingest.source",
                    ),
                ),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(
                        fields=("source", "bucket_start"), name="bucketcount_unique"
                    )
                ],
            },
        ),
        migrations.RunSQL(COPY_COUNTS, reverse_sql=migrations.RunSQL.noop),
        migrations.DeleteModel(name="TermCount"),
        analyze_often("mlengine_bucketcount"),
    ]
