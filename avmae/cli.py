"""How every tool in tools/ ends: an exit status that says whether the work was done, and a known
error as one line.

``run_tool(main)`` calls a tool's ``main(argv)``. A known error (a missing or unreadable file, a
bad value: ``OSError``, ``ValueError``, including the config's and the converters' errors, whose
messages name the file and the problem) is printed as one line on stderr and exits with status 2;
``--debug`` anywhere on the command line shows the traceback instead. ``main`` returns the exit
status (0: done; non-zero: the work was not done, already explained); a tool that returns a
summary instead is done. docs/architecture.md, "Layers".
"""

from __future__ import annotations

import sys
from typing import Callable

KNOWN_ERRORS = (OSError, ValueError)
ERROR_STATUS = 2


def run_tool(main: Callable[[list[str]], object], argv: list[str] | None = None) -> int:
    """``main(argv)``'s exit status, a known error turned into one line and status 2 (see the module doc)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        status = main(argv)
    except KNOWN_ERRORS as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message} (--debug shows the traceback)", file=sys.stderr)
        return ERROR_STATUS
    return status if isinstance(status, int) else 0
