"""Evaluation harnesses: the field's standard metrics on public data (``manage.py evaluate``).

- ``crisislex``: the trend detector replayed on CrisisLexT26 events.
- ``nab``: NAB's scorer; ``nab_harness``: the anomaly detector run on NAB's realTweets and
  scored with it.
"""
