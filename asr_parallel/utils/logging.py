"""Logging set-up shared by the entry points (time, level and module on every line), and ``say`` for
lines that several processes write to one stream."""

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

    ``print`` writes the text and its newline separately, and when Python runs unbuffered
    (PYTHONUNBUFFERED=1 or ``-u``; the build machines here set it) stderr is write-through, so
    each part is its own write(2): two processes sharing a stream (the launchers of two nodes, the
    ranks of one) can run their lines together, one "line" holding both messages and an empty one
    after it. A single ``write`` of up to PIPE_BUF bytes (4096 on
    Linux) to a pipe is not interleaved with other writers' (POSIX; not for regular files or
    terminals), so lines stay whole in either mode.
    """
    stream = sys.stderr if file is None else file
    stream.write(f"{message}\n")
    stream.flush()
