from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("alerts", "0010_merge_0009_delivery_channels_0009_lifecycle"),
    ]

    operations = [
        migrations.AddField(
            model_name="alert",
            name="explanation",
            field=models.JSONField(
                blank=True,
                help_text=(
                    "Why it fired (alerts.explain): measure, value, baseline, threshold, "
                    "score, window, series, top terms and authors, evidence posts. Null on "
                    "alerts fired before explanations existed."
                ),
                null=True,
            ),
        ),
    ]
