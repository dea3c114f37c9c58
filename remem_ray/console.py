"""What a sweep's console shows: lines our code marks, from any process of the cluster.

Trial and Train worker processes write their few console-worthy lines (epoch results, trial
events) with `say`, which tags them with MARK. The sweep driver receives every process's output
from Ray; it shows the tagged lines (tag removed) and sends everything to the sweep's log file.

`say` writes to sys.stdout directly: Ray Train replaces `print` in its workers with a logger
call that echoes each line twice.
"""

from __future__ import annotations

import sys

MARK = "[remem] "


def say(message: str) -> None:
    """A line for the sweep's console (and its log file), from any process."""
    sys.stdout.write(f"{MARK}{message}\n")
    sys.stdout.flush()


def marked(line: str) -> str | None:
    """The message of a tagged line (None for any other line)."""
    at = line.find(MARK)
    return line[at + len(MARK) :] if at >= 0 else None
