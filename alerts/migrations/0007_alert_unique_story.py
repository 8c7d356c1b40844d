"""A rule alerts on a story once: the partial unique constraint ``alert_unique_story``
on ``(rule, story_id)`` where ``story_id`` is set.

Before it, two alert workers could both fire for one story (and a story's members in
one batch could too), so a database may hold several alerts of one rule for one story.
None is deleted (an analyst may have worked it): the earliest (lowest id) keeps the
story, and the later ones have ``story_id`` set to NULL, so they stay listed, pushed and
worked as before, but no later member of the story updates or confirms them (they are
their trend's alone, as an alert fired before stories existed). Not reversed: removing
the constraint leaves the NULLs, which the model allows.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("alerts", "0006_alert_story_id"),
    ]

    operations = [
        migrations.RunSQL(
            sql=(
                "UPDATE alerts_alert AS a SET story_id = NULL FROM alerts_alert AS first "
                "WHERE first.rule_id = a.rule_id AND first.story_id = a.story_id "
                "AND first.id < a.id"
            ),
            reverse_sql=migrations.RunSQL.noop,
        ),
        migrations.AddConstraint(
            model_name="alert",
            constraint=models.UniqueConstraint(
                condition=models.Q(story_id__isnull=False),
                fields=("rule", "story_id"),
                name="alert_unique_story",
            ),
        ),
    ]
