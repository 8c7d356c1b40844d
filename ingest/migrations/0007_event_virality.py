"""Virality at posting time on events, and the index of an author's history.

``virality_score`` stays NULL until the ml pool scores the event (and for good when it
cannot: no active virality model, fewer than 100 earlier posts with a repost count).
The index (``ingest.models.AUTHOR_KEY``) serves the history lookup of
``ingest.virality_reads.virality_inputs``; it is partial (rows with a repost count only) and
built concurrently, so a large events table keeps taking writes meanwhile.
"""

import django.db.models.functions.comparison
import django.db.models.functions.text
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("ingest", "0006_deadletter_source_stage"),
    ]

    operations = [
        migrations.AddField(
            model_name="event",
            name="virality_model",
            field=models.CharField(
                blank=True,
                db_default="",
                default="",
                help_text='"name vN" of the virality model that scored it ("" when not scored).',
                max_length=120,
            ),
        ),
        migrations.AddField(
            model_name="event",
            name="virality_score",
            field=models.FloatField(
                blank=True,
                help_text="P(viral) in [0, 1] at posting time, from the author's earlier posts "
                "of the same source; null: no active virality model, fewer than 100 earlier "
                "posts with a repost count, or the ml pool did not reach it within its lag.",
                null=True,
            ),
        ),
        AddIndexConcurrently(
            model_name="event",
            index=models.Index(
                models.F("source"),
                django.db.models.functions.comparison.Coalesce(
                    django.db.models.functions.comparison.NullIf("author_id", models.Value("")),
                    models.Func(
                        django.db.models.functions.text.Lower(
                            django.db.models.functions.comparison.NullIf(
                                "author_handle", models.Value("")
                            )
                        ),
                        output_field=models.CharField(),
                        template="('@' || %(expressions)s)",
                    ),
                ),
                models.F("created_at"),
                condition=models.Q(("metrics__has_key", "reposts")),
                name="event_author_reposts_time",
            ),
        ),
    ]
