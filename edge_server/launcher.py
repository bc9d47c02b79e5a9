"""Starts `edge-server` as a child process and waits until it listens.

Tests, the demo and the benchmarks all need a real server in its own process (the gRPC and
torch threads of a server must not share a GIL with the clients being measured).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

READY = re.compile(r"edge-server listening on (\S+)")
ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    """A running edge-server; `address` is HOST:PORT, `log` collects its output."""

    def __init__(self, args: list[str] = (), echo: bool = False):
        # stop() ends it at once (no drain); a test of the drain gives its own --drain-s
        cmd = [sys.executable, "-m", "edge_server.cli", "--port", "0", "--drain-s", "0", *args]
        self.echo = echo
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.log: list[str] = []
        self.address = self._wait_ready()
        threading.Thread(target=self._drain, daemon=True).start()

    def _keep(self, line: str) -> None:
        self.log.append(line)
        if self.echo:
            sys.stderr.write(line)

    def _wait_ready(self) -> str:
        for line in self.proc.stdout:
            self._keep(line)
            found = READY.search(line)
            if found:
                return found.group(1)
        raise RuntimeError("edge-server exited before listening:\n" + "".join(self.log))

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self._keep(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
