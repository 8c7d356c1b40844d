"""Sentiment, emotion and offensive labels on events.

The label columns have a database default (the persist stage's bulk INSERT names only
the envelope's columns). Events enriched before this migration get the label VADER's
compound score gives (``mlengine.text.vader_label``: positive at 0.05 and above,
negative at -0.05 and below), recorded as ``vader``, as the enrich stage labels new
ones.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("ingest", "0002_autoanalyze"),
    ]

    operations = [
        migrations.AddField(
            model_name="event",
            name="emotion",
            field=models.CharField(blank=True, db_default="", default="", max_length=16),
        ),
        migrations.AddField(
            model_name="event",
            name="emotion_model",
            field=models.CharField(blank=True, db_default="", default="", max_length=120),
        ),
        migrations.AddField(
            model_name="event",
            name="emotion_scores",
            field=models.JSONField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="event",
            name="offensive",
            field=models.CharField(blank=True, db_default="", default="", max_length=16),
        ),
        migrations.AddField(
            model_name="event",
            name="offensive_model",
            field=models.CharField(blank=True, db_default="", default="", max_length=120),
        ),
        migrations.AddField(
            model_name="event",
            name="offensive_scores",
            field=models.JSONField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="event",
            name="scored_at",
            field=models.DateTimeField(
                blank=True, help_text="When the transformer heads labelled it.", null=True
            ),
        ),
        migrations.AddField(
            model_name="event",
            name="sentiment_label",
            field=models.CharField(blank=True, db_default="", default="", max_length=16),
        ),
        migrations.AddField(
            model_name="event",
            name="sentiment_model",
            field=models.CharField(
                blank=True,
                db_default="",
                default="",
                help_text='"name vN" of the head that labelled it, or "vader".',
                max_length=120,
            ),
        ),
        migrations.AddField(
            model_name="event",
            name="sentiment_scores",
            field=models.JSONField(
                blank=True, help_text="Probability per label (null from VADER).", null=True
            ),
        ),
        migrations.RunSQL(
            """
            UPDATE ingest_event SET
                sentiment_model = 'vader',
                sentiment_label = CASE
                    WHEN sentiment >= 0.05 THEN 'positive'
                    WHEN sentiment <= -0.05 THEN 'negative'
                    ELSE 'neutral' END
            WHERE sentiment IS NOT NULL
            """,
            migrations.RunSQL.noop,
        ),
    ]
