"""Ray runtime: the same command runs on an embedded local cluster or an existing one.

An embedded cluster is a handful of processes (GCS, raylet, dashboard and its agents, log
monitor, workers) that the driver starts. When the driver dies without shutting Ray down
(``kill -9``, the OOM killer), some of them outlive it, for a minute or for good. So every
embedded cluster is recorded in a small JSON file: before ``ray.init``, the driver's pid and
start time and a tag put in its environment (``MALMM_RAY_RUN``, inherited by what Ray starts);
after it, the session folder and the pid and start time of every process Ray started. Every
later ``init_ray`` and CLI command first reaps the clusters whose driver is dead: it kills
exactly the processes of those sessions — the recorded ones, their descendants, those carrying
the tag, and Ray processes holding the session folder in their command line or open files —
and never those of a run whose driver is alive, nor a cluster it only connected to
(``--address``, ``RAY_ADDRESS``).

Records live in ``$MALMM_RAY_RECORDS`` or else ``malmm-pipeline-ray-<uid>`` under the temporary
folder Ray uses (``$RAY_TMPDIR``, else the system's): local to the machine, like the pids in them.
See the README's architecture section.
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from pipeline import storage  # the cluster records; /proc is read directly (process state, not outputs)

RECORDS_ENV = "MALMM_RAY_RECORDS"


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> dict:
    """Connect to ``address`` / $RAY_ADDRESS, or start an embedded local cluster.

    Returns the cluster's resources. Safe to call twice. First reaps the embedded clusters of
    earlier drivers that died without shutting Ray down; records the one it starts.
    """
    import ray  # heavy: imported on use (keeps the CLI's start-up fast)

    if not ray.is_initialized():
        reap_orphans()
        address = address or os.environ.get("RAY_ADDRESS") or None
        kwargs = dict(address=address, logging_level=logging.WARNING, log_to_driver=True,
                      # the dashboard serves the State API that Ray Train V2's placement-group
                      # cleaner polls every second (without it, a warning per second)
                      include_dashboard=None,
                      # Ray's own INFO chatter in workers (one line per training step) hides our progress
                      # bars; warnings and errors still reach the driver
                      logging_config=ray.LoggingConfig(log_level="WARNING"))
        record = None
        kwargs["runtime_env"] = runtime_env(address)
        if address is None:
            kwargs["num_cpus"] = num_cpus
            record = begin_record()  # before ray.init: a kill during start-up leaves a record too
        ray.init(**kwargs)
        if record is not None:
            record_session(record)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the stages draw their own progress bar
        ctx.print_on_execution_start = False
    return ray.cluster_resources()


#: ``MALMM_SHIP_CODE=0``: the nodes of an ``--address`` cluster already have the project installed
SHIP_CODE_ENV = "MALMM_SHIP_CODE"


def runtime_env(address: str | None) -> dict:
    """The job's Ray runtime environment. Every worker gets this process's storage settings
    (``AWS_ENDPOINT_URL``, credentials …: `pipeline.storage.cluster_env`), so that it reaches the same
    object store. Workers of the embedded cluster import the project from this checkout
    (``PYTHONPATH``); on an existing cluster (``--address``, ``RAY_ADDRESS``) the ``pipeline`` and
    ``stages`` packages are shipped to the nodes as ``py_modules`` (Ray uploads them once per content
    hash), so nodes need only the dependencies, not the project — unless ``MALMM_SHIP_CODE=0``."""
    env: dict = {"env_vars": storage.cluster_env()}
    if address is None:
        env["env_vars"]["PYTHONPATH"] = _project_root()
    elif os.environ.get(SHIP_CODE_ENV, "1") != "0":
        root = Path(__file__).resolve().parents[1]
        env["py_modules"] = [str(root / "pipeline"), str(root / "stages")]
        env["excludes"] = ["__pycache__", "*.pyc"]
    return env


def _project_root() -> str:
    root = str(Path(__file__).resolve().parents[1])
    existing = os.environ.get("PYTHONPATH", "")
    return root + (os.pathsep + existing if existing else "")


def cluster_has_gpus() -> bool:
    import ray  # heavy: imported on use
    return ray.cluster_resources().get("GPU", 0) > 0


# ----------------------------------------------------------------------------- session records

RUN_ENV = "MALMM_RAY_RUN"  # the tag of the driver that started an embedded cluster, inherited by its processes
_SESSION_RE = re.compile(rb"(/[^\s\0=]*/session_\d{4}-\d\d-\d\d_[^/\s\0]+)")


def records_dir() -> Path:
    """Where embedded clusters are recorded (local to this machine and user)."""
    if os.environ.get(RECORDS_ENV):
        return Path(os.environ[RECORDS_ENV])
    base = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    return Path(base) / f"malmm-pipeline-ray-{os.getuid() if hasattr(os, 'getuid') else 0}"


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(name, parent pid, start time in clock ticks since boot) of a live process, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
    if fields[0] in ("Z", "X"):  # a zombie has finished; only its parent can still reap it
        return None
    return stat[stat.index("(") + 1:stat.rindex(")")], int(fields[1]), int(fields[19])


def _start_time(pid: int) -> int | None:
    """The process's start time: with its pid, its identity (pids are reused, start times are not)."""
    st = _stat(pid)
    return None if st is None else st[2]


def _alive(proc: dict) -> bool:
    return proc.get("start") is not None and _start_time(proc["pid"]) == proc["start"]


def _write(path: Path, rec: dict) -> None:
    storage.write_json(path, rec, raw=True, mode=storage.UMASK, indent=1)


def begin_record() -> Path | None:
    """Before starting an embedded cluster: record this driver and tag its environment."""
    if not sys.platform.startswith("linux"):
        return None  # identities come from /proc
    me = {"pid": os.getpid(), "start": _start_time(os.getpid())}
    tag = f"{me['pid']}-{me['start']}-{time.time_ns()}"
    os.environ[RUN_ENV] = tag
    d = records_dir()
    storage.makedirs(d)
    path = d / f"{tag}.json"
    _write(path, {"driver": me, "host": socket.gethostname(), "tag": tag, "session_dir": None, "raylet": None,
                  "processes": [], "recorded_at": time.time()})
    atexit.register(_forget, path)
    return path


def _forget(path: Path) -> None:
    """At a normal exit: shut Ray down (what Ray's own exit handler, registered earlier and so run
    later, would do) and drop the record once every recorded process has ended (what is left, the
    next run reaps)."""
    try:
        import ray  # heavy: imported on use
        if ray.is_initialized():
            ray.shutdown()
        procs = storage.read_json(path)["processes"]
    except Exception:  # at exit: never in the way
        return
    deadline = time.monotonic() + 2.0
    while any(_alive(p) for p in procs):
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    storage.remove(path)


def record_session(path: Path) -> None:
    """After ``ray.init``: add the session folder and every process Ray started to the record
    (or drop it when Ray only connected to a running cluster, e.g. one from `ray start`)."""
    try:
        import ray  # heavy: imported on use
        node = ray._private.worker._global_node
        started = {kind: [p.process.pid for p in infos if p.process is not None]
                   for kind, infos in node.all_processes.items()}
        session_dir = node.get_session_dir_path()
    except Exception:  # a Ray whose internals moved: the tag alone identifies the processes
        return
    procs = [{"pid": pid, "start": _start_time(pid), "kind": kind} for kind, pids in started.items() for pid in pids]
    procs = [p for p in procs if p["start"] is not None]
    if not procs:
        storage.remove(path)  # not ours to reap
        return
    rec = storage.read_json(path)
    rec.update(session_dir=session_dir, processes=procs,
               raylet=next((p for p in procs if p["kind"] == "raylet"), None))
    _write(path, rec)


class _Procs:
    """One look at every process of this machine: name, parent, start time; command line, environment
    and open files on demand."""

    def __init__(self):
        self.stat: dict[int, tuple[str, int, int]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
                self.stat[int(entry.name)] = st
        self.kids: dict[int, list[int]] = {}
        for pid, (_, ppid, _) in self.stat.items():
            self.kids.setdefault(ppid, []).append(pid)
        self._tags: dict[int, str | None] = {}

    def read(self, pid: int, what: str) -> bytes:
        try:
            return Path(f"/proc/{pid}/{what}").read_bytes()
        except OSError:
            return b""

    def tag(self, pid: int) -> str | None:
        if pid not in self._tags:
            prefix = f"{RUN_ENV}=".encode()
            self._tags[pid] = next((v[len(prefix):].decode(errors="replace") for v in self.read(pid, "environ").split(b"\0")
                                    if v.startswith(prefix)), None)
        return self._tags[pid]

    def holds(self, pid: int, folder: str) -> bool:
        try:
            fds = list(os.scandir(f"/proc/{pid}/fd"))
        except OSError:
            return False
        for fd in fds:
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue
            if target == folder or target.startswith(folder + "/"):
                return True
        return False

    def is_ray(self, pid: int) -> bool:
        name = self.stat[pid][0]
        cmdline = self.read(pid, "cmdline")
        return name.startswith(("ray::", "raylet", "gcs_server")) or b"/ray/" in cmdline or b"ray::" in cmdline

    def descendants(self, pids) -> set[int]:
        seen, todo = set(pids), list(pids)
        while todo:
            for child in self.kids.get(todo.pop(), []):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        return seen


def session_processes(rec: dict, procs: _Procs | None = None, protected: set[int] = frozenset()) -> list[dict]:
    """The live processes of a recorded session: the recorded ones still alive (same pid *and* start
    time), those carrying the driver's tag, Ray processes started since that name the session folder
    in their command line or hold a file of it open (its agents and workers, whose process titles
    overwrite their environment), and all their descendants; never one of ``protected``."""
    procs = procs or _Procs()
    since = rec["driver"]["start"] or 0
    found = {p["pid"] for p in rec["processes"] if procs.stat.get(p["pid"], (0, 0, None))[2] == p["start"]}
    candidates = [pid for pid, st in procs.stat.items() if st[2] >= since and pid not in protected]
    if rec.get("tag"):
        found |= {pid for pid in candidates if procs.tag(pid) == rec["tag"]}
    session = rec.get("session_dir")
    if not session:  # killed during ray.init: the session folder is in its GCS's or raylet's command line
        m = next((m for pid in sorted(found) if (m := _SESSION_RE.search(procs.read(pid, "cmdline")))), None)
        session = m.group(1).decode() if m else None
    if session:
        session = session.rstrip("/")
        for pid in candidates:
            if pid not in found and procs.is_ray(pid) and (
                    session.encode() in procs.read(pid, "cmdline") or procs.holds(pid, session)):
                found.add(pid)
    return [{"pid": pid, "start": procs.stat[pid][2]} for pid in sorted(procs.descendants(found) - protected)
            if pid in procs.stat]


def reap_orphans(*, wait_s: float = 5.0) -> list[int]:
    """Kill the processes of every recorded embedded cluster whose driver is dead; return their pids.

    A record whose driver is alive is left alone, and so is everything it started; a record from
    another host too. Processes get SIGTERM, then SIGKILL after ``wait_s / 2`` s; the record goes
    once none of them is left.
    """
    d = records_dir()
    if not sys.platform.startswith("linux") or not d.is_dir():
        return []
    host = socket.gethostname()
    records = []
    for path in storage.listdir(d, "*.json"):
        try:
            rec = storage.read_json(path)
        except (OSError, ValueError):
            continue  # being written, or not ours
        if rec.get("host") == host and isinstance(rec.get("driver"), dict):
            records.append((path, rec))
    dead = [(path, rec) for path, rec in records if not _alive(rec["driver"])]
    if not dead:
        return []
    procs = _Procs()
    # what a live run started (its driver, recorded or tagged processes and their descendants) is never touched
    live = [rec for _, rec in records if _alive(rec["driver"])]
    live_tags = {rec.get("tag") for rec in live} - {None}
    keep = {p["pid"] for rec in live for p in [rec["driver"], *rec["processes"]] if _alive(p)}
    if live_tags:
        keep |= {pid for pid in procs.stat if procs.tag(pid) in live_tags}
    protected = procs.descendants(keep) | {os.getpid()}
    killed: list[int] = []
    for path, rec in dead:
        victims = session_processes(rec, procs, protected)
        for sig, wait in ((signal.SIGTERM, wait_s / 2), (signal.SIGKILL, wait_s / 2)):
            for p in victims:
                if _alive(p):
                    try:
                        os.kill(p["pid"], sig)
                    except OSError:
                        pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(_alive(p) for p in victims):
                time.sleep(0.05)
            if not any(_alive(p) for p in victims):
                break
        killed += [p["pid"] for p in victims]
        if not any(_alive(p) for p in victims):
            storage.remove(path)
    if killed:
        logging.getLogger(__name__).warning("reaped %d process(es) of Ray sessions whose driver had died",
                                            len(killed))
    return killed
