"""Cooldown claims become per (rule, source, term): trends are per source.

Claims only hold cooldown state; they are dropped and rebuilt by the next alerts.
"""

from __future__ import annotations

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("alerts", "0001_initial"),
        ("ingest", "0002_event_uncounted"),
    ]

    operations = [
        migrations.DeleteModel(name="RuleTermClaim"),
        migrations.CreateModel(
            name="RuleTermClaim",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("term", models.CharField(max_length=200)),
                ("last_bucket_start", models.DateTimeField(null=True)),
                ("rule", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="+", to="alerts.alertrule")),
                ("source", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="+", to="ingest.source")),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(fields=("rule", "source", "term"), name="ruletermclaim_unique")
                ],
            },
        ),
    ]
