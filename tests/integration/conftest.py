"""Real servers for integration tests, started on 127.0.0.1 once per session and stopped by PID.

- ``scorer``: ``defectloop serve`` (local Ray + Ray Serve over HTTP) on a copy of a trained registry.
- ``label_studio``: a Label Studio server in a temporary data dir, with a legacy API token, local
  file serving and loopback webhooks allowed.
- ``s3``: seaweedfs (``weed mini``) with credentials, a bucket, and the AWS_* variables set.
- ``ray_head``: ``ray start --head --block`` (token auth disabled), for the Jobs API.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

SCORER_TOKEN = "integration-token"
S3_KEY, S3_SECRET, S3_BUCKET = "defectloop-it", "defectloop-it-secret", "defectloop"
LS_TOKEN = "0123456789abcdef0123456789abcdef01234567"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    url: str
    log: Path
    cmd: list[str]
    env: dict[str, str]

    def restart(self, ready_path: str, timeout: float = 120) -> None:
        """Start the same command again (same data), e.g. after a kill."""
        self.stop(30)
        fh = open(self.log, "a")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(ready_path, timeout)

    def wait_ready(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to our PID, then SIGKILL to what is left of its process group; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # children that outlived it (started in its own session)
        self.proc.wait(10)
        return self.proc.returncode


def start(name: str, cmd: list[str], env: dict[str, str], url: str, log: Path) -> Server:
    fh = open(log, "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(name, proc, url, log, cmd, env)


@pytest.fixture(scope="session")
def scorer_registry(served_registry, tmp_path_factory) -> Path:
    """A registry of the session's scorer that tests may change (new versions, bank updates)."""
    root = tmp_path_factory.mktemp("scorer") / "registry"
    shutil.copytree(served_registry, root)
    return root


@pytest.fixture(scope="session")
def scorer(scorer_registry, tmp_path_factory):
    port = free_port()
    env = {**os.environ, "DEFECTLOOP_API_TOKEN": SCORER_TOKEN, "DEFECTLOOP_POLL_S": "0.5",
           "DEFECTLOOP_THREADS": "2", "RAY_USAGE_STATS_ENABLED": "0"}
    log = tmp_path_factory.mktemp("logs") / "scorer.log"
    server = start("scorer", [sys.executable, "-m", "defectloop.cli", "serve", "--registry", str(scorer_registry),
                              "--port", str(port)], env, f"http://127.0.0.1:{port}", log)
    server.wait_ready("/v1/health", 180)
    server.token = SCORER_TOKEN
    yield server
    code = server.stop()
    assert code == 0, f"scorer did not shut down cleanly ({code}):\n{server.tail()}"


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """Label Studio 1.23 with user admin@example.com / defectloop and a legacy token; files under ``root``."""
    base = tmp_path_factory.mktemp("label-studio")
    root = base / "files"
    root.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("USERNAME", "PASSWORD", "PORT", "HOST")}
    env.update(LABEL_STUDIO_BASE_DATA_DIR=str(base / "data"), LATEST_VERSION_CHECK="false",
               LABEL_STUDIO_USERNAME="admin@example.com", LABEL_STUDIO_PASSWORD="defectloop",
               LABEL_STUDIO_USER_TOKEN=LS_TOKEN, LOCAL_FILES_SERVING_ENABLED="true",
               LOCAL_FILES_DOCUMENT_ROOT=str(root), USE_DEFAULT_BANNED_SUBNETS="false",
               LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true")
    exe = Path(sys.executable).with_name("label-studio")
    server = start("label-studio", [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1",
                                    "--port", str(port), "--data-dir", str(base / "data"),
                                    "--enable-legacy-api-token"],
                   env, f"http://127.0.0.1:{port}", base / "label-studio.log")
    server.wait_ready("/health", 240)
    server.token = LS_TOKEN
    server.root = root
    yield server
    server.stop(30)


class SeaweedS3:
    """A real S3 server: ``weed mini`` on 127.0.0.1 with signature-checked credentials."""

    bucket = S3_BUCKET

    def __init__(self, folder: Path, port: int | None = None):
        self.folder = folder
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server: Server | None = None

    def start(self) -> SeaweedS3:
        import boto3

        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
        exe = Path(sys.executable).with_name("weed")
        self.server = start("seaweedfs", [str(exe), "mini", f"-dir={self.folder}", "-ip=127.0.0.1",
                                          "-ip.bind=127.0.0.1", f"-s3.port={self.port}", "-admin.ui=false"],
                            env, self.endpoint, self.folder.parent / f"{self.folder.name}.log")
        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                              aws_secret_access_key=S3_SECRET, region_name="us-east-1")
        deadline = time.monotonic() + 60
        while True:
            try:
                names = [b["Name"] for b in client.list_buckets()["Buckets"]]
                if S3_BUCKET not in names:
                    client.create_bucket(Bucket=S3_BUCKET)
                return self
            except Exception:
                if time.monotonic() > deadline or self.server.proc.poll() is not None:
                    raise RuntimeError(f"seaweedfs did not start:\n{self.server.tail()}") from None
                time.sleep(0.3)

    def kill(self) -> None:
        """Stop at once (SIGKILL to our PID): the outage tests need it down now, not in 20 s."""
        self.server.proc.kill()
        self.server.proc.wait(10)

    def stop(self) -> None:
        self.server.stop(60)

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                "AWS_REGION": "us-east-1", "DEFECTLOOP_S3_RETRIES": "2"}


@pytest.fixture(scope="session")
def s3_server():
    """The class, for tests that need an S3 server of their own (to kill it)."""
    return SeaweedS3


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One seaweedfs for the session; the AWS_* variables point boto3 (and subprocesses) at it."""
    server = SeaweedS3(tmp_path_factory.mktemp("s3") / "data").start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A Ray head as `ray start --head` runs it, with its own temp dir; yields the dashboard URL."""
    temp = tmp_path_factory.mktemp("ray-head")
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    exe = Path(sys.executable).with_name("ray")
    # every agent port of its own: another Ray of this session (tests' local Ray) holds the defaults
    agents = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port",
                                                     "ray-client-server-port")]
    server = start("ray-head", [str(exe), "start", "--head", "--port=0", "--num-cpus=2", f"--dashboard-port={port}",
                                "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", *agents, "--block"],
                   env, f"http://127.0.0.1:{port}", temp / "head.log")
    server.wait_ready("/api/version", 120)
    yield server
    server.stop(60)
