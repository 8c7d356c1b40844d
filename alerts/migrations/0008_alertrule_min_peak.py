"""``AlertRule.min_peak``: the least value at an anomaly's peak (posts in the peak bucket
of a count series) for an "anomaly" rule to fire; 5 by default, existing rules included
(a spike of a post or two alerted before; a rule that wants those sets it to 1)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("alerts", "0007_alert_unique_story"),
    ]

    operations = [
        migrations.AddField(
            model_name="alertrule",
            name="min_peak",
            field=models.IntegerField(default=5),
        ),
    ]
