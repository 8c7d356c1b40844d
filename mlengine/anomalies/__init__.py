"""Anomalies: the anomaly stage, its detector and the analysts' watches.

- ``stage``: the stage's entry point (``advance_anomalies``) and its run: plan, series
  started and retired, buckets stepped.
- ``series``: what a run holds per series and source, the detector groups and the saved
  detector states.
- ``persistence``: a run's writes (series, points, anomalies).
- ``watches``: the writes of the watches (``save_watch``, ``delete_watch``).
- ``detector``: the streaming detector, pure.
"""
