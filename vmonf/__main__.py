"""``python -m vmonf``: the ``vmonf`` command."""

from __future__ import annotations

import sys

from vmonf.cli import main

if __name__ == "__main__":
    sys.exit(main())
