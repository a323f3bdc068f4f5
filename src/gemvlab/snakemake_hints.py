"""Lines the Snakefile adds where Snakemake's own words mislead (rules/hooks.smk): its lock
error advises --unlock even while the run holding the lock is alive (following it, two runs
delete each other's records), and a run stopped by a signal ends with "At least one job did
not complete successfully" although no job failed. Snakemake's text cannot change; these
lines come before it."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType

LOCKS = Path(".snakemake") / "locks"
_PROC = Path("/proc")

# The signals that stopped this run, in order (note_signals records them).
_stopped_by: list[str] = []


def _parent(pid: int) -> int:
    """A process's parent pid, from /proc/<pid>/stat (after the command name in parentheses)."""
    return int((_PROC / str(pid) / "stat").read_text().rpartition(")")[2].split()[1])


def _ancestors() -> set[int]:
    """This process and its parents: a report job's snakemake runs under the main one."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        pid = _parent(pid)
    return pids


def _snakemakes_in(workdir: Path) -> set[int]:
    """Pids of the snakemake processes of this host whose working folder is ``workdir``."""
    found = set()
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")[:3]
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:  # ended meanwhile, or another user's
            continue
        if cwd == workdir and b"snakemake" in {os.path.basename(a) for a in argv}:
            found.add(int(entry.name))
    return found


def lock_hint(workdir: Path) -> str | None:
    """One line on the locks in .snakemake/locks/ before Snakemake meets them: whether another
    snakemake of this host runs here (then --unlock is wrong) or none does (then the lock is
    stale). None without locks, or inside the snakemake that holds them (a report job)."""
    if not any((workdir / LOCKS).glob("*.lock")):
        return None
    if not _PROC.is_dir():
        return ("gemvlab: .snakemake/locks/ holds a lock: another snakemake may be running in "
                "this folder (see `ps aux | grep snakemake`); only once none runs, "
                "`snakemake --unlock` clears it")
    ancestors = _ancestors()
    running = _snakemakes_in(workdir.resolve())
    if running & (ancestors - {os.getpid()}):
        return None
    others = sorted(running - ancestors)
    if others:
        return (f"gemvlab: snakemake (pid {', '.join(map(str, others))}) is running in this "
                "folder and holds its lock: wait for it or stop it, and do not run "
                "`snakemake --unlock` meanwhile, or the two runs delete each other's records")
    return ("gemvlab: .snakemake/locks/ holds a stale lock (no snakemake runs in this folder "
            "on this host): unless one runs on another host sharing it, `snakemake --unlock` "
            "clears it")


def _note(previous: Callable[[int, FrameType | None], object], signum: int,
          frame: FrameType | None) -> None:
    _stopped_by.append(signal.Signals(signum).name)
    previous(signum, frame)


def note_signals() -> None:
    """Record SIGTERM and SIGINT, then let Snakemake's own handlers act: called from onstart,
    once Snakemake has installed them."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if callable(previous):
            signal.signal(sig, partial(_note, previous))


def stop_hint() -> str | None:
    """The line for onerror when a signal, not a failing job, ended the run."""
    if not _stopped_by:
        return None
    return (f"gemvlab: this run was stopped by {_stopped_by[0]}, not by a failing job (a job "
            "that shows an error above was stopped with it): run the same command again to go "
            "on; the finished runs are kept")
