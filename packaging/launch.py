"""Puts the packaged nodekeeper and the dependencies built for this Python on sys.path."""

import sys

HOME = "/usr/lib/nodekeeper"
sys.path[:0] = [f"{HOME}/app", f"{HOME}/vendor"]

from nodekeeper.cli import main  # noqa: E402

sys.exit(main())
