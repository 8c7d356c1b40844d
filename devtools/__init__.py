"""Development tooling: what ``make run``, ``make test``, ``make bench`` and ``make lint``
run around the product, never the product itself.

- ``devtools.localservices``: PostgreSQL and Redis for a command (the environment's, the
  local servers', or private embedded ones: ``devtools.postgres``, ``devtools.redis``),
  and the ``.run/env`` file that tells a second terminal where they are
  (``devtools.envfile``; the product reads it with ``twiscope.platform_env``).
- ``devtools.run``: ``make run`` itself: migrate, create the demo login, start every
  process of ``devtools/supervisord.conf`` under supervisord (``devtools.supervise``,
  ``devtools.logrelay``) and say where everything is once the web server answers.

Not a Django app, not in the images (``.dockerignore``), and never imported by the
product (``twiscope``, the apps): the dependency runs one way, from here to there.
"""
