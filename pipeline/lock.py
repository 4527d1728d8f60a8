"""One writer per output folder: the lock file that `extract`, `train` and `infer` hold while they write.

The lock is ``{folder}/malmm.lock``, a small JSON file naming its holder::

    {"pid": 4242, "host": "node-3", "started": "2026-12-02T13:40:00Z", "command": "extract",
     "argv": "malmm-pipeline extract --manifest … --out …"}

A second writer into the same folder is refused at once (`OutputLockedError`, naming the
holder's pid, host, start time, command and the lock file). The file is also locked with
``flock`` while it is held, and the kernel drops that lock when its process dies however
it dies; so a lock left behind by a killed run (``kill -9``, a crash, a power cut) is
*stale* and the next run takes it over with a message. On one host a stale lock is also
recognised by its pid no longer running, which covers file systems without ``flock``. A
lock written by another host cannot be checked from here: it is refused, and the message
says to delete the file if that process is gone. Released (the file removed) when the
block ends. A folder in an object store (``s3://…``) has no ``flock``: its lock file lives on the
machine that writes it, under the local cache (``locks/<hash of the URI>/malmm.lock``), which
keeps two writers on that machine apart; on a cluster the driver is the one writer of its
output folders. See the README's architecture section.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pipeline import layout, storage

LOCK_NAME = layout.LOCK_NAME  # flock needs a real local file: this module stays off the storage layer


class OutputLockedError(SystemExit):
    """Another process writes into this folder. A SystemExit: the command exits 1 with the message."""

    def __init__(self, path: str | Path, holder: dict, why: str = ""):
        self.path, self.holder = Path(path), holder
        who = (f"pid {holder.get('pid')} on host {holder.get('host')} (command {holder.get('command')!r}, "
               f"started {holder.get('started')})") if holder else "another process (details not yet written)"
        super().__init__(f"error: {self.path.parent} is being written by {who}; lock file {self.path}. "
                         + (why or "Wait for it to finish, or use another --out."))


def _flock(fd: int) -> bool | None:
    """True: locked now; False: another open file holds it; None: the file system has no flock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP …


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except (OverflowError, ValueError, TypeError):
        return False
    return True


def read_holder(path: str | Path) -> dict:
    """The holder recorded in a lock file ({} when empty, unreadable or gone)."""
    try:
        text = Path(path).read_text()
        d = json.loads(text) if text.strip() else {}
        return d if isinstance(d, dict) else {"garbage": text[:200]}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        return {"unreadable": str(e)}


class OutputLock:
    """``with OutputLock(folder, "extract"):`` – hold the folder's lock file for the block."""

    def __init__(self, folder: str | Path, command: str):
        self.folder = Path(folder)
        if storage.is_uri(folder):  # an object store has no flock: the folder is locked on this machine
            uri = str(storage.path(folder))
            self.folder = storage.cache_dir().parent / "locks" / hashlib.sha256(uri.encode()).hexdigest()[:24]
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.fd: int | None = None
        self.took_over: dict | None = None  # the stale holder replaced, if any

    def acquire(self) -> "OutputLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        for _ in range(50):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            locked = _flock(fd)
            if locked is False:
                os.close(fd)
                prev = self._holder_soon()
                why = ""
                if prev.get("host") == host and "pid" in prev and not _pid_alive(prev["pid"]):
                    why = (f"pid {prev['pid']} is gone, but a process it started still holds the lock (a leftover "
                           f"worker?): stop that process, or use another --out.")
                raise OutputLockedError(self.path, prev, why)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released (unlinked) between our open and our flock: try the new file
                os.close(fd)
                continue
            prev = read_holder(self.path)
            if prev:
                stale = self._stale(prev, host, locked)
                if not stale:
                    os.close(fd)
                    why = ("It was written on another host and cannot be checked from here: if that process is "
                           f"gone, delete {self.path}." if prev.get("host") != host else "")
                    raise OutputLockedError(self.path, prev, why)
                self.took_over = prev
                print(f"{self.command}: taking over the stale lock {self.path} of pid {prev.get('pid')} on "
                      f"{prev.get('host')} ({prev.get('command')!r}, started {prev.get('started')}): that process "
                      f"no longer runs", file=sys.stderr, flush=True)
            info = {"pid": os.getpid(), "host": host, "command": self.command,
                    "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "argv": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info, sort_keys=True) + "\n").encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return self
        raise OutputLockedError(self.path, read_holder(self.path), "The lock file keeps changing hands.")

    @staticmethod
    def _stale(prev: dict, host: str, locked: bool | None) -> bool:
        if "pid" not in prev or "host" not in prev:  # a holder that died while writing it, or garbage
            return locked is True
        if prev["host"] != host:
            return False
        if locked is True:  # nobody holds the flock: its holder is gone (whatever its pid is now)
            return True
        return not _pid_alive(prev["pid"])

    def _holder_soon(self) -> dict:
        """The holder's record; a holder that has just created the file gets a moment to write it."""
        for _ in range(20):
            prev = read_holder(self.path)
            if prev:
                return prev
            time.sleep(0.05)
        return {}

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)  # while still locked: a waiter that opened it re-checks the inode
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
