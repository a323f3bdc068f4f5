"""A stage's one-line error, also written to fd 3 where the caller passed one: every job's
shell hands Snakemake's stderr on as fd 3 before `> {log} 2>&1`, so the line reaches the user
even when the job log cannot take it (a full disk left a 0-byte log and "exit status 1")."""

from __future__ import annotations

import os
import sys

CALLER_FD = 3
# Every job's shell starts with this (rules/hooks.smk): Snakemake's own prefix, then its stderr
# handed on as fd 3 (a prefix, not a change to each rule, so no job reruns for changed code).
SHELL_PREFIX = "set -euo pipefail; exec 3>&2; "


def _identity(fd: int) -> tuple[int, int] | None:
    """The file an fd is open on (device, inode), or None when it is closed."""
    try:
        stat = os.fstat(fd)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


# Taken at import, before the stage opens files of its own that could land on fd 3.
_CALLER = _identity(CALLER_FD)


def to_caller(line: str) -> None:
    """Write ``line`` to the fd 3 this process was started with, if any and if it is not its
    stderr already (then the line would show twice)."""
    if _CALLER is None or _identity(CALLER_FD) != _CALLER or _CALLER == _identity(2):
        return
    try:
        os.write(CALLER_FD, f"{line}\n".encode())
    except OSError:  # the caller's stderr is gone too: nothing left to tell
        pass


def say(line: str) -> None:
    """Print an error line to stderr and to the caller's fd 3; a full disk under stderr
    loses only the copy there."""
    to_caller(line)
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass
