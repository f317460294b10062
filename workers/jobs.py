"""Retraining as a Ray job: submit, follow, read logs (Ray Jobs API, ``JobSubmissionClient``), and
the runners the live loop starts retrainings with (``RayJobRunner``, ``ProcessRunner``).

Token auth (on by default for ``ray start --head`` in Ray 2.60) is handled by Ray's client from
``RAY_AUTH_MODE=token`` plus ``RAY_AUTH_TOKEN`` (or ``~/.ray/auth_token``); ``token`` here sends
it explicitly as ``Authorization: Bearer``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_ADDRESS = os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265")


def client(address: str | None = None, token: str | None = None):
    from ray.job_submission import JobSubmissionClient

    token = token or os.environ.get("DEFECTLOOP_RAY_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address or DEFAULT_ADDRESS, headers=headers)


def retrain_command(registry: str, data: str, workers: int = 0, anomalies_per_class: int = 0,
                    categories: str | None = None, python: str = "python", full: bool = False,
                    hold_back: float = 0.0, promote: bool = True, extra: list[str] | None = None) -> list[str]:
    """The retraining entry point's command line (``python`` is the interpreter that runs it;
    ``extra``: more of its arguments, e.g. ``--full`` or ``--set dmad.steps=3000``)."""
    args = [python, "-m", "defectloop.workers.retrain", "--registry", registry, "--data", data,
            "--workers", str(workers), "--anomalies-per-class", str(anomalies_per_class)]
    if categories:
        args += ["--categories", categories]
    if full:
        args.append("--full")
    if hold_back:
        args += ["--hold-back", str(hold_back)]
    if not promote:
        args.append("--no-promote")
    return args + list(extra or [])


def submit_retrain(registry: str, data: str, workers: int = 0, anomalies_per_class: int = 0,
                   categories: str | None = None, address: str | None = None, python: str = "python",
                   token: str | None = None, env: dict[str, str] | None = None, retries: int = 5, full: bool = False,
                   hold_back: float = 0.0, promote: bool = True, extra: list[str] | None = None) -> str:
    """Submit the retraining entry point; returns the job id. ``python`` is the interpreter on the cluster."""
    args = retrain_command(registry, data, workers, anomalies_per_class, categories, python, full, hold_back, promote,
                           extra)
    passed = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "DEFECTLOOP_S3_"))}
    jobs = client(address, token)
    for attempt in range(retries + 1):
        try:
            return jobs.submit_job(entrypoint=shlex.join(args), runtime_env={"env_vars": {**passed, **(env or {})}},
                                   metadata={"defectloop": "retrain", "registry": registry})
        except RuntimeError as e:  # a head that just started: "No available agent to submit job, please try again later"
            if "try again" not in str(e) or attempt == retries:
                raise
            time.sleep(min(2.0 * 2**attempt, 10.0))
    raise AssertionError("unreachable")


def status(job_id: str, address: str | None = None, token: str | None = None) -> dict:
    info = client(address, token).get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message, "entrypoint": info.entrypoint, "start_time": info.start_time,
            "end_time": info.end_time}


def logs(job_id: str, address: str | None = None, token: str | None = None) -> str:
    return client(address, token).get_job_logs(job_id)


class RayJobRunner:
    """Retrainings submitted to a Ray cluster through the Jobs API (a dashboard address)."""

    def __init__(self, registry: str, data: str, address: str, python: str = sys.executable, hold_back: float = 0.2,
                 extra: list[str] | None = None):
        self.registry, self.data, self.address, self.python = registry, data, address, python
        self.hold_back, self.extra = hold_back, list(extra or [])

    def submit(self) -> str:
        return submit_retrain(self.registry, self.data, address=self.address, python=self.python,
                              hold_back=self.hold_back, promote=False, extra=self.extra)

    def poll(self, job_id: str) -> tuple[str, str]:
        """("RUNNING" | "SUCCEEDED" | "FAILED", message)."""
        info = status(job_id, self.address)
        state = info["status"]
        if state in ("PENDING", "RUNNING"):
            return "RUNNING", info["message"] or ""
        return ("SUCCEEDED" if state == "SUCCEEDED" else "FAILED"), info["message"] or state


class ProcessRunner:
    """Retrainings as child processes of this one, where no Ray dashboard takes jobs (the same entry
    point as a Ray job runs; its memory returns to the system when it ends)."""

    def __init__(self, registry: str, data: str, log_dir: str | Path, hold_back: float = 0.2,
                 extra: list[str] | None = None):
        self.registry, self.data, self.log_dir = registry, data, Path(log_dir)
        self.hold_back, self.extra = hold_back, list(extra or [])
        self.procs: dict[str, subprocess.Popen] = {}

    def submit(self) -> str:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        job_id = f"retrain-{int(time.time() * 1000)}"
        cmd = retrain_command(self.registry, self.data, python=sys.executable, hold_back=self.hold_back,
                              promote=False, extra=self.extra)
        with open(self.log_dir / f"{job_id}.log", "w") as log:
            self.procs[job_id] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        return job_id

    def poll(self, job_id: str) -> tuple[str, str]:
        proc = self.procs.get(job_id)
        if proc is None:
            return "FAILED", "unknown job (the loop restarted while it ran)"
        code = proc.poll()
        if code is None:
            return "RUNNING", ""
        if code == 0:
            return "SUCCEEDED", ""
        tail = (self.log_dir / f"{job_id}.log").read_text(errors="replace").strip().splitlines()[-1:]
        return "FAILED", f"exit status {code}: {tail[0] if tail else ''}"
