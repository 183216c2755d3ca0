"""The process table as Linux's ``/proc`` shows it: a process's state, its parent and group, the tree below a process
and the CPU time it used. The launcher and the serving supervisor ask it whether a child still runs (a zombie does
not); tests and benches use it to find ranks and workers and to check that nothing outlived a command.

Every reader tolerates processes that end while it reads: a process that is gone is simply not there.
"""

from __future__ import annotations

import os

__all__ = ["cpu_seconds", "descendants", "grandchildren", "group_members", "live_children", "proc_state", "running"]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].decode().split()
    except (OSError, IndexError):
        return None


def proc_state(pid: int | None) -> str | None:
    """The process's state letter (R, S, D, T for stopped, t for traced, Z for a zombie), None when it is gone."""
    fields = None if pid is None else _fields(pid)
    return fields[0] if fields else None


def running(pid: int | None) -> bool:
    """Whether ``pid`` runs: it exists and is not a zombie (where there is no ``/proc``: ``kill(pid, 0)`` answers)."""
    if pid is None:
        return False
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return proc_state(pid) not in (None, "Z")


def _table() -> list[tuple[int, int, int]]:
    """``(pid, parent pid, process group)`` of every live (not zombie) process."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _fields(entry)
            if fields and fields[0] != "Z":
                out.append((int(entry), int(fields[1]), int(fields[2])))
    return out


def live_children() -> dict[int, list[int]]:
    """Parent pid -> its live children's pids, sorted."""
    kids: dict[int, list[int]] = {}
    for pid, ppid, _ in sorted(_table()):
        kids.setdefault(ppid, []).append(pid)
    return kids


def descendants(root: int) -> dict[int, int]:
    """Every live process below ``root``: pid -> depth (1 for its children, 2 for theirs...)."""
    kids, found, todo = live_children(), {}, [(root, 0)]
    while todo:
        parent, depth = todo.pop()
        for child in kids.get(parent, []):
            if child not in found:
                found[child] = depth + 1
                todo.append((child, depth + 1))
    return found


def grandchildren(pid: int) -> list[int]:
    """The live children of ``pid``'s children, sorted: a launcher's ranks, below its forkserver."""
    return sorted(child for child, depth in descendants(pid).items() if depth == 2)


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    return sorted(pid for pid, _, group in _table() if group == pgid)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time ``pid`` has used so far, in seconds (0.0 when it is gone)."""
    fields = _fields(pid)
    return 0.0 if not fields else (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
