"""A real S3-API server for the object-storage tests: moto's server mode, started by the tests on
127.0.0.1 (a free port), stopped when they end. Nothing else is ever a target.

`S3Server.env()` gives the standard AWS variables pointing at it, which the storage layer (and
every Ray worker, through the runtime environment) reads."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import closing

HOST = "127.0.0.1"


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, log_path: str | os.PathLike | None = None):
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout_s: float = 30.0) -> "S3Server":
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env()})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # bounded wait for the port to answer
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode} (log: {self.log_path})")
            try:
                urllib.request.urlopen(self.url + "/", timeout=1).close()
                return self
            except urllib.error.HTTPError:
                return self  # it answers (an error page is an answer)
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.url} within {timeout_s:.0f} s")

    def create_bucket(self, name: str) -> str:
        req = urllib.request.Request(f"{self.url}/{name}", method="PUT")
        urllib.request.urlopen(req, timeout=10).close()
        return f"s3://{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
