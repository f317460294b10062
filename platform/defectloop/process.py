"""A server process we start ourselves and stop by its PID (Label Studio, the scorer, S3, Ray).

Started in its own session, so that stopping it can also reach the children it forked without
touching anything else on the machine (``ray stop`` or ``pkill`` would).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


class ManagedProcess:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], url: str, log: str | Path):
        self.name, self.cmd, self.env, self.url, self.log = name, cmd, env, url, Path(log)
        self.proc: subprocess.Popen | None = None

    def start(self) -> ManagedProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.log, "a")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, path: str, timeout: float) -> ManagedProcess:
        """Poll ``url + path`` until it answers 200; a clear error (with the log's tail) otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc and self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL to it and every process below it at once (a crash, for tests of what survives one)."""
        if self.proc is not None and self.proc.poll() is None:
            below = descendants(self.proc.pid)
            self.proc.kill()
            _kill_all(below)
            self.proc.wait(10)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM to our PID, then SIGKILL to what is left of its session; returns the exit code."""
        if self.proc is None:
            return None
        below: list[tuple[int, str]] = []
        if self.proc.poll() is None:
            below = descendants(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # children that outlived it
        _kill_all(below)  # and those that left its session (Ray starts some in their own)
        self.proc.wait(10)
        return self.proc.returncode

    def restart(self, path: str, timeout: float = 120) -> ManagedProcess:
        self.stop(30)
        return self.start().wait_ready(path, timeout)


def _stat(pid: int | str) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, ..., starttime at 19)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[tuple[int, str]]:
    """Every live process below ``pid``, as (pid, start time), from /proc (empty where there is none)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat(entry.name)
            children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def _kill_all(processes: list[tuple[int, str]]) -> None:
    """SIGKILL each process that is still the one we saw (same start time: never a reused PID)."""
    for pid, start in processes:
        with contextlib.suppress(OSError, ValueError, IndexError):
            if _stat(pid)[19] == start:
                os.kill(pid, signal.SIGKILL)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that ``finally`` blocks stop the servers this process started.

    Python's default SIGTERM ends the process on the spot: ``docker stop``, a Kubernetes eviction
    or ``kill`` of the demo left its Label Studio, scorer and Ray running, orphaned.
    """
    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def ray_head(temp_dir: str | Path, num_cpus: int | None = None, env: dict[str, str] | None = None) -> ManagedProcess:
    """``ray start --head --block`` on 127.0.0.1 with every port of its own (not started yet; ``.address``).

    Its own ports: another Ray on the machine (a test's, a user's) holds the defaults, and a dashboard
    agent that cannot bind leaves the Jobs API with "No available agent to submit job". Token auth is
    off: this is a cluster of one machine, for this process's own use. ``temp_dir`` must be short
    (Ray's socket paths are limited to ~100 characters).
    """
    port, dashboard = free_port(), free_port()
    head = _ray_start("ray-head", ["--head", f"--port={port}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
                                   f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}"],
                      num_cpus, env, f"http://127.0.0.1:{dashboard}", Path(temp_dir) / "head.log")
    head.address, head.temp_dir = f"127.0.0.1:{port}", str(temp_dir)
    return head


def ray_worker(address: str, log: str | Path, num_cpus: int | None = None) -> ManagedProcess:
    """``ray start --address ADDR --block``: a second node of ``ray_head``'s cluster, on this machine
    (its agents on ports of their own, like the head's). Not started yet; it serves no HTTP (ready:
    when the head's dashboard lists it, ``alive_nodes``)."""
    return _ray_start("ray-worker", [f"--address={address}"], num_cpus, None, "", log)


def _ray_start(name: str, args: list[str], num_cpus: int | None, env: dict[str, str] | None, url: str,
               log: str | Path) -> ManagedProcess:
    """``ray start ... --block`` of a node on 127.0.0.1, its agents on free ports, token auth off."""
    agents = [f"--{a}={free_port()}" for a in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                               "metrics-export-port", "runtime-env-agent-port")]
    run_env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    run_env.pop("RAY_ADDRESS", None)
    cpus = [f"--num-cpus={num_cpus}"] if num_cpus else []
    cmd = [str(Path(sys.executable).with_name("ray")), "start", *args, "--node-ip-address=127.0.0.1", *cpus, *agents,
           "--block"]
    return ManagedProcess(name, cmd, run_env, url, log)


def driver_env(head: ManagedProcess) -> dict[str, str]:
    """The environment of a driver process (a `defectloop` command) for ``ray_head``'s cluster: its
    address, and token auth off as on the head (a ``ray.init`` in this process sets
    RAY_AUTH_MODE=token in its environment, and a driver that inherits it never gets its actors)."""
    return {**os.environ, "RAY_ADDRESS": head.address, "RAY_AUTH_MODE": "disabled"}


def alive_nodes(head: ManagedProcess) -> int:
    """How many nodes the head's dashboard lists as alive (0 while it cannot tell)."""
    try:
        nodes = httpx.get(f"{head.url}/api/v0/nodes", timeout=5).json()["data"]["result"]["result"]
    except (httpx.HTTPError, KeyError, ValueError):
        return 0
    return sum(1 for n in nodes if n.get("state") == "ALIVE")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
