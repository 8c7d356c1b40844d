"""Trends: the trend stage, its detector, its stories and their forecasts.

- ``stage``: the stage's entry points (``advance_stream``, ``sweep_streams``,
  ``count_late_events``): stream clocks, the streams one advance takes, hand-offs.
- ``scan``: the count of an advance, bucket after bucket in lockstep rounds, scored in one
  ``score_terms`` call a round.
- ``counts``: what the count reads and writes: buckets-so-far, baselines, trend rows.
- ``story_assignment``: each new trend into a story, with its story's forecast.
- ``params``: the stage's parameters, from settings.
- ``detector``, ``stories``, ``forecast``: the algorithms, pure (the term test, the story
  rule and the in-memory detectors, the volume forecast).
"""
