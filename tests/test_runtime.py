"""Ray start-up: the processes of an embedded cluster whose driver was killed with SIGKILL are gone
after the next run starts, and those of a run still alive are left alone."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process identities come from /proc")

# A driver that starts an embedded cluster, runs one task (so a worker exists), prints every process of
# its session — what Ray started, and everything its raylet started — then waits (for a line on stdin).
DRIVER = r"""
import json, os, sys
from pathlib import Path
import ray
from pipeline.runtime import init_ray

init_ray(None, num_cpus=1)

@ray.remote
def pid():
    return os.getpid()

worker = ray.get(pid.remote())
node = ray._private.worker._global_node
started = [p.process.pid for infos in node.all_processes.values() for p in infos]
raylet = node.all_processes["raylet"][0].process.pid

def start(p):
    try:
        s = Path(f"/proc/{p}/stat").read_text()
    except OSError:
        return None
    return int(s[s.rindex(")") + 2:].split()[19])

kids = []
for e in os.scandir("/proc"):
    if e.name.isdigit():
        try:
            s = Path(f"/proc/{e.name}/stat").read_text()
        except OSError:
            continue
        if int(s[s.rindex(")") + 2:].split()[1]) == raylet:
            kids.append(int(e.name))
procs = {p: start(p) for p in set(started + kids + [worker])}
print(json.dumps({"driver": os.getpid(), "procs": procs}), flush=True)
sys.stdin.readline()
ray.shutdown()
"""


def _start(p: int) -> int | None:
    try:
        s = Path(f"/proc/{p}/stat").read_text()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _alive(procs: dict) -> list[int]:
    return [int(p) for p, start in procs.items() if start is not None and _start(int(p)) == start]


def _driver(env) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # bounded by the test's timeout
    assert line, "the driver did not start Ray"
    return proc, json.loads(line)


@pytest.mark.slow  # three embedded clusters one after another: 1 to 2 minutes on 2 busy cores
@pytest.mark.timeout(300)
def test_killed_drivers_processes_are_reaped_by_the_next_run_and_a_live_run_is_kept(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "", "MALMM_RAY_RECORDS": str(tmp_path / "records"),
           "PYTHONPATH": str(ROOT)}
    killed, info = _driver(env)
    live, live_info = _driver(env)
    try:
        assert len(info["procs"]) >= 4 and _alive(info["procs"]), info
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
        assert _alive(info["procs"]), "some of the killed driver's processes outlive it (what this test is about)"

        # the next run: a new embedded cluster
        r = subprocess.run([sys.executable, "-c", "from pipeline.runtime import init_ray; import ray; "
                            "init_ray(None, num_cpus=1); ray.shutdown()"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-2000:]
        deadline = time.monotonic() + 10
        while _alive(info["procs"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _alive(info["procs"])
        assert not left, f"processes of the killed run still alive after the next run: {left}"
        # the run that is still alive keeps every process
        assert sorted(_alive(live_info["procs"])) == sorted(int(p) for p in live_info["procs"]), live_info
    finally:
        if live.poll() is None:
            live.stdin.write("\n")
            live.stdin.flush()
            live.wait(timeout=60)
        for p in _alive(info["procs"]):  # leave nothing behind, whatever happened
            os.kill(p, signal.SIGKILL)


def test_any_command_reaps_and_a_live_drivers_processes_are_protected(tmp_path, monkeypatch):
    """Any command reaps (not only those that start Ray); a record of a live driver is kept."""
    from typer.testing import CliRunner

    from pipeline import runtime
    from stages.cli import app

    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv("MALMM_RAY_RECORDS", str(records))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        me = {"pid": os.getpid(), "start": _start(os.getpid())}
        gone = {"pid": sleeper.pid, "start": _start(sleeper.pid)}
        dead_driver = {"pid": 2 ** 22 + 7, "start": 1}  # no such process
        host = socket.gethostname()
        dead = json.dumps({"driver": dead_driver, "host": host, "session_dir": "/nonexistent/s", "raylet": None,
                           "processes": [gone]})
        (records / "dead.json").write_text(dead)
        (records / "live.json").write_text(json.dumps({"driver": me, "host": host, "session_dir": "/nonexistent/t",
                                                       "raylet": None, "processes": [gone]}))
        r = CliRunner().invoke(app, ["status", str(tmp_path)])
        assert r.exit_code == 2  # neither a features nor a run folder; the reaping happened before
        # a process recorded by a live driver is protected, even when a dead record names it too
        assert sleeper.poll() is None and (records / "live.json").exists()
        (records / "live.json").unlink()
        (records / "dead.json").write_text(dead)
        r = CliRunner().invoke(app, ["status", str(tmp_path)])
        sleeper.wait(timeout=10)  # killed by the command's reaping
        assert sleeper.returncode == -signal.SIGTERM
        assert not (records / "dead.json").exists()
        assert runtime.reap_orphans() == []
    finally:
        if sleeper.poll() is None:
            sleeper.kill()


def test_a_driver_killed_while_ray_starts_is_reaped_by_its_tag(tmp_path, monkeypatch):
    """A record written before ray.init holds only the driver and the tag its processes inherit."""
    from pipeline import runtime

    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv("MALMM_RAY_RECORDS", str(records))
    host = socket.gethostname()
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    orphan = subprocess.Popen(sleep, env={**os.environ, runtime.RUN_ENV: "dead-run"})
    kept = subprocess.Popen(sleep, env={**os.environ, runtime.RUN_ENV: "live-run"})
    live_driver = subprocess.Popen(sleep)  # not the parent of either (this process is, and is not a driver here)
    try:
        live = {"pid": live_driver.pid, "start": _start(live_driver.pid)}
        for name, driver, tag in (("dead", {"pid": 2 ** 22 + 9, "start": 1}, "dead-run"), ("live", live, "live-run")):
            (records / f"{name}.json").write_text(json.dumps({"driver": driver, "host": host, "tag": tag,
                                                              "session_dir": None, "raylet": None, "processes": []}))
        assert runtime.reap_orphans() == [orphan.pid]
        orphan.wait(timeout=10)
        assert kept.poll() is None and not (records / "dead.json").exists() and (records / "live.json").exists()
    finally:
        for p in (orphan, kept, live_driver):
            if p.poll() is None:
                p.kill()


def test_runtime_env_ships_the_project_and_the_storage_settings(monkeypatch):
    from pipeline.runtime import runtime_env
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9999")
    local = runtime_env(None)
    assert local["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9999" and "PYTHONPATH" in local["env_vars"]
    assert "py_modules" not in local
    remote = runtime_env("ray://head:10001")
    assert [os.path.basename(m) for m in remote["py_modules"]] == ["pipeline", "stages"]
    assert remote["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9999" and "PYTHONPATH" not in remote["env_vars"]
    monkeypatch.setenv("MALMM_SHIP_CODE", "0")
    assert "py_modules" not in runtime_env("ray://head:10001")
