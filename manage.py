#!/usr/bin/env python
"""Django's command-line utility for Twiscope.

In development, settings take ``DATABASE_URL``, ``REDIS_URL`` and ``SECRET_KEY`` from the
running ``make run`` when they are unset (``twiscope.platform_env.load_platform_env``),
so every command works in a second terminal; with no platform running, this says so in
one line (exit status 1) instead of a traceback.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twiscope.settings")
    from django.core.management import execute_from_command_line

    from twiscope.platform_env import PlatformNotRunning

    try:
        execute_from_command_line(sys.argv)
    except PlatformNotRunning as exc:
        sys.exit(f"manage.py: {exc}")


if __name__ == "__main__":
    main()
