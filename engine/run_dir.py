"""What one launch owns in its run directory: the lock, the checkpoint history it continues, and
the metrics log it appends to.

- **Lock** (``<run_dir>/.lock``: pid, host, start time). A second live launch on the same run
  directory fails at once; a lock whose process is gone (same host) is stale and taken over.
- **History.** Resuming from step S continues the history that ends at S: checkpoints of later
  steps belong to an abandoned future and move to ``checkpoints/abandoned/`` (never deleted, never
  resumed by ``resume=auto``), and ``latest`` names S again.
- **Metrics.** Records of steps after S are dropped from ``metrics.jsonl`` when training resumes,
  so each step appears once.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from engine import checkpoint as ckpt

LOCK = ".lock"


class RunDirLocked(RuntimeError):
    """Another live launch holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``O_EXCL`` lock file naming its holder. Held by rank 0 of a launch for the launch's life."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunDirLocked(f"run_dir {str(self.path.parent)!r} is locked by another launch ({self.path})")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            holder, pid, host = None, None, None  # unreadable: a crash while it was written
        if holder is not None and (host != socket.gethostname() or _alive(pid)):
            where = "this host" if host == socket.gethostname() else f"host {host!r}"
            raise RunDirLocked(
                f"run_dir {str(self.path.parent)!r} is in use by another launch (pid {pid} on {where}, started "
                f"{holder.get('started', '?')}); two launches on one run_dir would overwrite each other's "
                f"checkpoints. Stop that launch, or choose another run_dir; if it is surely dead, delete {self.path}")
        print(f"warning: taking over the stale lock {self.path} (holder {holder or 'unreadable'} is gone)",
              file=sys.stderr, flush=True)
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def abandon_newer(root: Path, step: int) -> list[Path]:
    """Move the checkpoints of steps after ``step`` (a history this run abandons by resuming from
    an older step) to ``root/abandoned/``; point ``latest`` back at ``step`` when it lives here."""
    moved = []
    newer = [p for p in ckpt.list_checkpoints(root) if ckpt.parse_step(p.name) > step]
    if newer:
        dest = root / "abandoned"
        dest.mkdir(exist_ok=True)
        for p in newer:
            target = dest / p.name
            n = 1
            while target.exists():
                target, n = dest / f"{p.name}.{n}", n + 1
            os.replace(p, target)
            moved.append(target)
    here = root / ckpt.step_dir_name(step)
    if (here / ckpt.MANIFEST).is_file():
        ckpt._update_latest(root, here.name)
    elif newer:
        (root / "latest").unlink(missing_ok=True)
    return moved


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the records of steps after ``step`` (superseded by a resume); returns how many."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)
    return len(lines) - len(keep)


def created_dirs(path: Path) -> list[Path]:
    """The directories ``path.mkdir(parents=True)`` would create, innermost first."""
    out = []
    p = Path(path).absolute()
    while not p.exists():
        out.append(p)
        p = p.parent
    return out


def remove_if_empty(dirs: list[Path]) -> None:
    for d in dirs:  # innermost first
        try:
            d.rmdir()
        except OSError:
            return
