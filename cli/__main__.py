"""``python -m cscr.cli``: the ``cscr`` command."""

import sys

from cscr.cli import main

if __name__ == "__main__":
    sys.exit(main())
