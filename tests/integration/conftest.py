"""Real servers for integration tests, started on 127.0.0.1 once per session and stopped by PID
(``defectloop.process.ManagedProcess``).

- ``scorer``: ``defectloop serve`` (local Ray + Ray Serve over HTTP) on a copy of a trained registry.
- ``label_studio``: Label Studio in a temporary data dir (``defectloop.labeling.server``).
- ``s3``: seaweedfs (``weed mini``) with credentials, a bucket, and the AWS_* variables set.
- ``ray_head``: ``ray start --head --block`` (token auth disabled), for the Jobs API.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from defectloop.labeling.server import label_studio as label_studio_process
from defectloop.process import ManagedProcess, free_port
from defectloop.process import ray_head as ray_head_process

SCORER_TOKEN = "integration-token"
S3_KEY, S3_SECRET, S3_BUCKET = "defectloop-it", "defectloop-it-secret", "defectloop"


@pytest.fixture(scope="session")
def scorer_registry(served_registry, tmp_path_factory) -> Path:
    """A registry of the session's scorer that tests may change (new versions, bank updates)."""
    root = tmp_path_factory.mktemp("scorer") / "registry"
    shutil.copytree(served_registry, root)
    return root


@pytest.fixture(scope="session")
def scorer(scorer_registry, s3, tmp_path_factory):
    """The session's scorer; after ``s3``, so that the S3 endpoint (where Label Studio's presigned
    URLs point) is among the hosts it fetches from."""
    port, uris = free_port(), tmp_path_factory.mktemp("uris")  # the folder JSON requests may name
    env = {**os.environ, "DEFECTLOOP_API_TOKEN": SCORER_TOKEN, "DEFECTLOOP_POLL_S": "0.5",
           "DEFECTLOOP_THREADS": "2", "DEFECTLOOP_BODY_TIMEOUT_S": "5", "DEFECTLOOP_ALLOWED_ROOTS": str(uris),
           "RAY_USAGE_STATS_ENABLED": "0"}
    server = ManagedProcess("scorer", [sys.executable, "-m", "defectloop.cli", "serve", "--registry",
                                       str(scorer_registry), "--port", str(port)],
                            env, f"http://127.0.0.1:{port}", tmp_path_factory.mktemp("logs") / "scorer.log")
    server.start().wait_ready("/v1/health", 180)
    server.token, server.uris = SCORER_TOKEN, uris
    yield server
    code = server.stop()
    assert code == 0, f"scorer did not shut down cleanly ({code}):\n{server.tail()}"


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """Label Studio 1.23 with a legacy token; local files below ``.root``."""
    base = tmp_path_factory.mktemp("label-studio")
    (base / "files").mkdir()
    server = label_studio_process(base / "data", base / "files").start().wait_ready("/health", 240)
    yield server
    server.stop(30)


class SeaweedS3:
    """A real S3 server: ``weed mini`` on 127.0.0.1 with signature-checked credentials."""

    bucket = S3_BUCKET

    def __init__(self, folder: Path, port: int | None = None):
        self.folder = folder
        self._use_port(port or free_port())

    def _use_port(self, port: int) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
        exe = Path(sys.executable).with_name("weed")
        self.server = ManagedProcess("seaweedfs", [str(exe), "mini", f"-dir={self.folder}", "-ip=127.0.0.1",
                                                   "-ip.bind=127.0.0.1", f"-s3.port={port}", "-admin.ui=false"],
                                     env, self.endpoint, self.folder.parent / f"{self.folder.name}.log")

    def start(self, attempts: int = 3) -> SeaweedS3:
        """Start and create the bucket. A port that another process took between ``free_port`` and
        the server's own check ("Port allocation failed", seen once in CI) means a new port."""
        import boto3

        self.folder.mkdir(parents=True, exist_ok=True)
        self.server.start()
        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                              aws_secret_access_key=S3_SECRET, region_name="us-east-1")
        deadline = time.monotonic() + 60
        while True:
            try:
                if S3_BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
                    client.create_bucket(Bucket=S3_BUCKET)
                return self
            except Exception:
                exited = self.server.proc.poll() is not None
                if exited and attempts > 1 and "Port allocation failed" in self.server.tail():
                    self._use_port(free_port())
                    return self.start(attempts - 1)
                if time.monotonic() > deadline or exited:
                    raise RuntimeError(f"seaweedfs did not start:\n{self.server.tail()}") from None
                time.sleep(0.3)

    def kill(self) -> None:
        """Stop at once: the outage tests need it down now, not in 20 s."""
        self.server.kill()

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
    """A Ray head as `ray start --head` runs it, with its own temp dir and ports."""
    server = ray_head_process(tmp_path_factory.mktemp("ray-head"), num_cpus=2)
    server.start().wait_ready("/api/version", 120)
    yield server
    server.stop(60)


STACK_TOKEN = "stack-token"
#: a small first model, as the unit tests train (the stack's defaults are the product's)
SMALL_MODEL = {"image_size": 128, "coreset_ratio": 0.1,
               "dmad": {"steps": 120, "warm_steps": 30, "batch_size": 512, "synthetic_per_category": 2, "train_patches": 20_000}}


@pytest.fixture(scope="session")
def stack(label_studio, tmp_path_factory):
    """`defectloop up` on generated data below Label Studio's document root, attached to the
    session's Label Studio: local Ray, the scorer and the live loop; stopped by SIGTERM at the end."""
    import json

    from defectloop.data.synthetic import make_dataset

    base = tmp_path_factory.mktemp("stack")
    data = make_dataset(base / "data", n_train=16, n_test_good=5, n_test_bad=6, size=128, seed=3)
    (base / "model.json").write_text(json.dumps(SMALL_MODEL))
    state = label_studio.root / "stack-state"  # its pool must be below Label Studio's document root
    env = {**os.environ, "DEFECTLOOP_API_TOKEN": STACK_TOKEN, "LABEL_STUDIO_API_KEY": label_studio.token,
           "LOCAL_FILES_DOCUMENT_ROOT": str(label_studio.root),
           "DEFECTLOOP_THREADS": "2", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    server = ManagedProcess("stack", [sys.executable, "-m", "defectloop.cli", "up", "--data", str(data), "--state",
                                      str(state), "--config", str(base / "model.json"), "--reconcile-s", "5",
                                      "--retrain-after", "1000", "--label-studio-url", label_studio.url],
                            env, "", base / "stack.log")
    server.start()
    deadline = time.monotonic() + 300
    while not (state / "stack.json").is_file():
        if server.proc.poll() is not None or time.monotonic() > deadline:
            server.stop(60)
            raise RuntimeError(f"`defectloop up` did not write {state}/stack.json within 300 s:\n{server.tail()}")
        time.sleep(0.5)
    info = json.loads((state / "stack.json").read_text())
    server.url, server.info, server.state, server.data = info["serve_url"], info, state, data
    yield server
    code = server.stop(120)
    assert code == 0, f"`defectloop up` did not stop cleanly ({code}):\n{server.tail()}"
    assert not (state / "stack.json").exists()
