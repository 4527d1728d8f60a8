"""Ray runtime: the same command runs on an embedded local cluster or an existing one.

An embedded cluster is a handful of processes (GCS, raylet, dashboard and its agents, log
monitor, workers) that the driver starts. When the driver dies without shutting Ray down
(``kill -9``, the OOM killer), some of them outlive it, for a minute or for good. So every
embedded cluster is recorded in a small JSON file (the driver's pid, the session folder, the
pid of every process Ray started, each with its start time), and every later ``init_ray`` and
CLI command first reaps the clusters whose driver is dead: it kills exactly the processes of
those sessions — the recorded ones, their descendants and the processes that carry the
session folder (in their command line or their open files) — and never those of a run whose driver is alive, nor
a cluster it only connected to (``--address``, ``RAY_ADDRESS``).

Records live in ``$MALMM_RAY_RECORDS`` or else ``malmm-pipeline-ray-<uid>`` under the temporary
folder Ray uses (``$RAY_TMPDIR``, else the system's): local to the machine, like the pids in them.
See the README's architecture section.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

RECORDS_ENV = "MALMM_RAY_RECORDS"


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> dict:
    """Connect to ``address`` / $RAY_ADDRESS, or start an embedded local cluster.

    Returns the cluster's resources. Safe to call twice. First reaps the embedded clusters of
    earlier drivers that died without shutting Ray down; records the one it starts.
    """
    import ray

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
        if address is None:
            kwargs["num_cpus"] = num_cpus
            # keep the project importable by workers of the embedded cluster
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": _project_root()}}
        ray.init(**kwargs)
        if address is None:
            record_session()
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the stages draw their own progress bar
        ctx.print_on_execution_start = False
    return ray.cluster_resources()


def _project_root() -> str:
    root = str(Path(__file__).resolve().parents[1])
    existing = os.environ.get("PYTHONPATH", "")
    return root + (os.pathsep + existing if existing else "")


def cluster_has_gpus() -> bool:
    import ray
    return ray.cluster_resources().get("GPU", 0) > 0


# ----------------------------------------------------------------------------- session records

def records_dir() -> Path:
    """Where embedded clusters are recorded (local to this machine and user)."""
    if os.environ.get(RECORDS_ENV):
        return Path(os.environ[RECORDS_ENV])
    base = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    return Path(base) / f"malmm-pipeline-ray-{os.getuid() if hasattr(os, 'getuid') else 0}"


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, from /proc): with the pid, its identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    if fields[0] in ("Z", "X"):  # a zombie has finished; only its parent can still reap it
        return None
    return int(fields[19])


def _alive(proc: dict) -> bool:
    return proc.get("start") is not None and _start_time(proc["pid"]) == proc["start"]


def record_session() -> Path | None:
    """Record the embedded cluster this driver started (nothing when Ray only connected to one)."""
    if not sys.platform.startswith("linux"):
        return None  # identities come from /proc
    try:
        import ray
        node = ray._private.worker._global_node
        started = {kind: [p.process.pid for p in infos if p.process is not None]
                   for kind, infos in node.all_processes.items()}
        session_dir = node.get_session_dir_path()
    except Exception:  # a Ray whose internals moved: run on, unrecorded
        return None
    procs = [{"pid": pid, "start": _start_time(pid), "kind": kind}
             for kind, pids in started.items() for pid in pids]
    procs = [p for p in procs if p["start"] is not None]
    if not procs:
        return None  # connected to a running cluster (e.g. one from `ray start`): not ours to reap
    raylet = next((p for p in procs if p["kind"] == "raylet"), None)
    rec = {"driver": {"pid": os.getpid(), "start": _start_time(os.getpid())}, "host": socket.gethostname(),
           "session_dir": session_dir, "raylet": raylet, "processes": procs, "recorded_at": time.time()}
    d = records_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{os.getpid()}-{Path(session_dir).name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, path)
    return path


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _belongs_to(pid: int, rec: dict, since: int) -> bool:
    """A process of the recorded session that is not a recorded one (an agent or worker its raylet
    started): a Ray process (by its name or command line) started after the session that names the
    session folder in its command line, holds a file of it open (its logs), or carries the raylet's
    pid in its environment."""
    start = _start_time(pid)
    if start is None or start < since:
        return False
    session = rec["session_dir"].rstrip("/")
    proc = Path(f"/proc/{pid}")
    try:
        cmdline = (proc / "cmdline").read_bytes()
        stat = (proc / "stat").read_text()
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        # only Ray's own processes (a `tail -f` of the session's logs is not one)
        if not (comm.startswith(("ray::", "raylet", "gcs_server")) or b"/ray/" in cmdline or b"ray::" in cmdline):
            return False
        if session.encode() in cmdline:
            return True
        for fd in os.scandir(proc / "fd"):
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue
            if target == session or target.startswith(session + "/"):
                return True
        raylet = rec.get("raylet")
        if raylet and not _alive(raylet) and _start_time(raylet["pid"]) is not None:
            return False  # its pid now belongs to another process (maybe another run's raylet)
        # (a process title set by Ray may have overwritten the environment's memory: not always there)
        return bool(raylet) and f"RAY_RAYLET_PID={raylet['pid']}".encode() in (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _descendants(pids, kids: dict[int, list[int]]) -> set[int]:
    seen, todo = set(pids), list(pids)
    while todo:
        for child in kids.get(todo.pop(), []):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def session_processes(rec: dict, protected: set[int] = frozenset(), kids: dict | None = None) -> list[dict]:
    """The live processes of a recorded session: the recorded ones still alive (same pid *and* start
    time), their descendants, and any other process of the session (see :func:`_belongs_to`);
    never one of ``protected`` (this process, live runs' processes)."""
    kids = _children() if kids is None else kids
    found = {p["pid"] for p in rec["processes"] if _alive(p)}
    since = min((p["start"] for p in rec["processes"] if p["start"] is not None), default=0)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) not in found and _belongs_to(int(entry.name), rec, since):
            found.add(int(entry.name))
    out = []
    for pid in sorted(_descendants(found, kids) - protected):
        start = _start_time(pid)
        if start is not None:
            out.append({"pid": pid, "start": start})
    return out


def reap_orphans(*, wait_s: float = 5.0) -> list[int]:
    """Kill the processes of every recorded embedded cluster whose driver is dead; return their pids.

    A record whose driver is alive is left alone; one from another host is left alone too. Processes
    get SIGTERM, then SIGKILL after ``wait_s / 2`` s; the record goes once none of them is left.
    """
    d = records_dir()
    if not sys.platform.startswith("linux") or not d.is_dir():
        return []
    host = socket.gethostname()
    records = []
    for path in sorted(d.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being written, or not ours
        if rec.get("host") == host:
            records.append((path, rec))
    dead = [(path, rec) for path, rec in records if not _alive(rec["driver"])]
    if not dead:
        return []
    kids = _children()
    # what a live run started (its driver, recorded processes and their descendants) is never touched
    live = [p["pid"] for _, rec in records if _alive(rec["driver"])
            for p in [rec["driver"], *rec["processes"]] if _alive(p)]
    protected = _descendants(live, kids) | {os.getpid()}
    killed: list[int] = []
    for path, rec in dead:
        procs = session_processes(rec, protected, kids)
        for sig, wait in ((signal.SIGTERM, wait_s / 2), (signal.SIGKILL, wait_s / 2)):
            for p in procs:
                if _alive(p):
                    try:
                        os.kill(p["pid"], sig)
                    except OSError:
                        pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(_alive(p) for p in procs):
                time.sleep(0.05)
            if not any(_alive(p) for p in procs):
                break
        killed += [p["pid"] for p in procs]
        if not any(_alive(p) for p in procs):
            path.unlink(missing_ok=True)
    if killed:
        logging.getLogger(__name__).warning("reaped %d process(es) of Ray sessions whose driver had died",
                                            len(killed))
    return killed
