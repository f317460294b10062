"""Retraining as a Ray job: submit, follow, read logs (Ray Jobs API, ``JobSubmissionClient``).

Token auth (on by default for ``ray start --head`` in Ray 2.60) is handled by Ray's client from
``RAY_AUTH_MODE=token`` plus ``RAY_AUTH_TOKEN`` (or ``~/.ray/auth_token``); ``token`` here sends
it explicitly as ``Authorization: Bearer``.
"""

from __future__ import annotations

import os
import shlex
import time

DEFAULT_ADDRESS = os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265")


def client(address: str | None = None, token: str | None = None):
    from ray.job_submission import JobSubmissionClient

    token = token or os.environ.get("DEFECTLOOP_RAY_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address or DEFAULT_ADDRESS, headers=headers)


def submit_retrain(registry: str, data: str, workers: int = 0, anomalies_per_class: int = 0,
                   categories: str | None = None, address: str | None = None, python: str = "python",
                   token: str | None = None, env: dict[str, str] | None = None, retries: int = 5, full: bool = False) -> str:
    """Submit the retraining entry point; returns the job id. ``python`` is the interpreter on the cluster."""
    args = [python, "-m", "defectloop.workers.retrain", "--registry", registry, "--data", data,
            "--workers", str(workers), "--anomalies-per-class", str(anomalies_per_class)]
    if categories:
        args += ["--categories", categories]
    if full:
        args.append("--full")
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
