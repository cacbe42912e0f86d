"""One line of progress or notice for the person at the terminal: stderr, flushed at once (stdout
stays for results that scripts read)."""

from __future__ import annotations

import sys


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
