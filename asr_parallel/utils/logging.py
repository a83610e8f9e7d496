"""Logging set-up shared by the entry points: time, level and module on every line."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
        force=True,
    )



def say(message: str, file=None) -> None:
    """Print one line to ``file`` (stderr by default) in a single write, then flush.

    ``print`` writes the text and its newline separately, and stderr is write-through, so two
    processes sharing a stream (the launchers of two nodes, the ranks of one) can run their lines
    together: one "line" holding both messages and an empty one after it. A single ``write`` of up
    to PIPE_BUF bytes is atomic on a pipe (POSIX), so lines stay whole.
    """
    stream = sys.stderr if file is None else file
    stream.write(f"{message}\n")
    stream.flush()
