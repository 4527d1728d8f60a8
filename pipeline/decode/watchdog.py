"""The watchdog pool: decoding runs in warm worker processes that a deadline can kill.

Parent side: :class:`Worker` (one decode process, reached through a Unix socket pair, with an
anonymous shared-memory file, ``memfd``, for the frames) and :class:`Pool` (the warm workers of this
process; ``POOL``). Worker side: :func:`worker_main` (serve requests with
:func:`pipeline.decode.engines.handle`) and :class:`Arena` (its side of the frame buffer). How it
behaves (timeouts, crashes, reuse, fork, parent death): the package doc, :mod:`pipeline.decode`.
"""
from __future__ import annotations

import atexit
import io
import mmap
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from pipeline.decode.engines import handle
from pipeline.decode.results import DecodeError

#: a warm worker is replaced after this many requests (bounds leaks in native code)
WORKER_MAX_REQUESTS = 200
#: a frame arena larger than this is given back after each request
ARENA_KEEP_BYTES = 256 << 20
#: at most this many idle workers are kept per process
POOL_MAX_IDLE = 4

# the folder that holds the ``pipeline`` package this module belongs to
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ============================================================================ parent side

class WorkerDied(Exception):
    """The worker process died (a crash in native code): retried with the next engine."""


class Worker:
    """One warm decode process, reached through a Unix socket pair."""

    def __init__(self):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = parent
        self.log = tempfile.TemporaryFile(mode="a+b")
        # frames come back through this shared-memory file, reused (and grown) from request to request
        self.arena = new_memfd()
        self._map = None
        # the worker imports this package from the same checkout as its parent (sys.argv[1])
        boot = ("import sys; sys.path.insert(0, sys.argv[1]); from pipeline.decode.watchdog import worker_main; "
                "worker_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))")
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        fds = (child.fileno(),) + ((self.arena,) if self.arena is not None else ())
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot, _ROOT, str(child.fileno()), str(os.getpid()),
             str(self.arena if self.arena is not None else -1)],
            pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log,
            env=env, close_fds=True)
        child.close()
        self.requests = 0
        self.owner_pid = os.getpid()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._close()

    def stop(self) -> None:
        """Ask politely (EOF on its socket), then kill."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close()

    def _close(self) -> None:
        for f in (self.sock, self.log):
            try:
                f.close()
            except OSError:
                pass
        self._unmap()
        if self.arena is not None:
            try:
                os.close(self.arena)
            except OSError:
                pass
            self.arena = None

    def _unmap(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except (BufferError, ValueError):
                pass
            self._map = None

    def take_frames(self, reply: dict) -> np.ndarray:
        """Copy the frames of ``reply`` out of the arena (which the next request overwrites)."""
        shape = tuple(reply["shape"])
        nbytes = int(np.prod(shape))
        if reply.get("inline") is not None:
            return np.frombuffer(bytearray(reply.pop("inline")), dtype=np.uint8).reshape(shape)
        out = np.empty(shape, np.uint8)
        if nbytes == 0:
            return out
        size = os.fstat(self.arena).st_size
        if self._map is None or len(self._map) != size:
            self._unmap()
            self._map = mmap.mmap(self.arena, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        src = np.frombuffer(self._map, dtype=np.uint8, count=nbytes)
        np.copyto(out.reshape(-1), src)
        del src
        if size > ARENA_KEEP_BYTES:  # give a huge arena back (the worker maps it afresh next time)
            self._unmap()
            os.ftruncate(self.arena, 0)
        return out

    def log_tail(self, n: int = 600) -> str:
        try:
            self.log.seek(0, io.SEEK_END)
            size = self.log.tell()
            self.log.seek(max(0, size - n))
            return self.log.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def request(self, msg: dict, deadline: float) -> dict:
        self.requests += 1
        try:
            self.log.truncate(0)
        except OSError:
            pass
        payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            self.sock.sendall(struct.pack("!Q", len(payload)) + payload)
            return pickle.loads(recv_msg(self.sock, deadline))
        except (socket.timeout, TimeoutError):
            raise
        except (EOFError, ConnectionError, OSError) as e:
            raise WorkerDied(self._death_message(e)) from None

    def _death_message(self, e: Exception) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        how = (f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}")
        tail = self.log_tail()
        return f"decoder process died ({how})" + (f": {tail}" if tail else "")


def recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("connection closed")
        got += k
    return bytes(buf)


def recv_msg(sock: socket.socket, deadline: float | None) -> bytes:
    (n,) = struct.unpack("!Q", recv_exact(sock, 8, deadline))
    return recv_exact(sock, n, deadline)


class Pool:
    """Warm workers of this process (re-created after fork: a child never uses its parent's workers)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.idle: list[Worker] = []
        self.pid = os.getpid()

    def _check_fork(self):
        if os.getpid() != self.pid:  # we are a forked child: those workers belong to the parent
            self.idle = []
            self.lock = threading.Lock()
            self.pid = os.getpid()

    def acquire(self) -> Worker:
        self._check_fork()
        with self.lock:
            while self.idle:
                w = self.idle.pop()
                if w.alive():
                    return w
                w._close()
        return Worker()

    def release(self, w: Worker) -> None:
        if w.owner_pid != os.getpid():
            return
        if not w.alive() or w.requests >= WORKER_MAX_REQUESTS:
            w.stop()
            return
        with self.lock:
            if len(self.idle) < POOL_MAX_IDLE:
                self.idle.append(w)
                return
        w.stop()

    def close_all(self) -> None:
        self._check_fork()
        with self.lock:
            ws, self.idle = self.idle, []
        for w in ws:
            w.stop()

    def run(self, msg: dict, deadline: float, want_frames: bool) -> dict:
        if time.monotonic() >= deadline:
            raise DecodeError("timeout", msg["path"], "no time left for decoding")
        try:
            w = self.acquire()
        except OSError as e:
            raise DecodeError("decode_error", msg["path"], f"cannot start a decoder process: {e}") from None
        LAST_WORKER["pid"] = w.pid
        try:
            reply = w.request(dict(msg, inline=w.arena is None), deadline)
        except (socket.timeout, TimeoutError):
            w.kill()
            raise DecodeError("timeout", msg["path"], "decoding did not finish in time; the decoder process "
                              "was killed") from None
        except WorkerDied:
            w.kill()
            raise
        except BaseException:  # e.g. KeyboardInterrupt while waiting: the worker state is unknown
            w.kill()
            raise
        try:
            if reply.get("ok") and want_frames:
                reply["frames"] = w.take_frames(reply)
        finally:
            self.release(w)
        return reply


POOL = Pool()
LAST_WORKER: dict = {}
atexit.register(POOL.close_all)


def new_memfd() -> int | None:
    if hasattr(os, "memfd_create"):
        try:
            return os.memfd_create("malmm-decode", os.MFD_CLOEXEC)
        except OSError:
            return None
    return None


# ============================================================================ worker side

def worker_main(fd: int, parent_pid: int, arena_fd: int = -1) -> None:
    """Serve requests from the parent until it closes the socket (or goes away)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which kills us if needed
    sock = socket.socket(fileno=fd)

    def watch_parent():  # exit when the parent dies, even while decoding (native code releases the GIL)
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    try:  # warm imports before the first request
        import av
        import av.filter  # noqa: F401
        import av.video.reformatter  # noqa: F401
        av.logging.set_level(av.logging.ERROR)
    except Exception:  # noqa: BLE001  (a broken PyAV shows up as a decode error later, with fallback)
        pass
    arena = Arena(arena_fd) if arena_fd >= 0 else None
    while True:
        try:
            msg = pickle.loads(recv_msg(sock, None))
        except (EOFError, OSError):
            os._exit(0)
        reply = handle(msg, arena)
        if "array" in reply:
            arr = reply.pop("array")
            if msg.get("inline"):
                reply["inline"] = arr.tobytes()
            del arr
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            sock.sendall(struct.pack("!Q", len(data)) + data)
        except OSError:
            os._exit(0)


class Arena:
    """The worker's side of the shared frame buffer: grown when a request needs more, mapped once."""

    def __init__(self, fd: int):
        self.fd = fd
        self.mm = None

    def array(self, shape: tuple) -> np.ndarray:
        nbytes = int(np.prod(shape))
        size = os.fstat(self.fd).st_size
        if size < nbytes:
            os.ftruncate(self.fd, nbytes)
            size = nbytes
        if self.mm is None or len(self.mm) != size:
            old, self.mm = self.mm, None
            if old is not None:
                try:
                    old.close()
                except BufferError:
                    pass
            self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return np.frombuffer(self.mm, dtype=np.uint8, count=nbytes).reshape(shape)
