"""Scorer settings: defaults, then a YAML/JSON file, then ``DEFECTLOOP_*`` environment variables,
then explicit overrides (command-line flags, Serve ``user_config``).

Every field ``name`` is read from ``DEFECTLOOP_<NAME>`` (``DEFECTLOOP_API_TOKEN``,
``DEFECTLOOP_MODEL``, ...); the Label Studio connection also from ``LABEL_STUDIO_URL`` /
``LABEL_STUDIO_API_KEY``, the names Label Studio's own ML backends use.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

#: fields a running replica applies without a restart (Serve ``reconfigure``)
RELOADABLE = frozenset({"model", "version", "poll_s", "max_batch_size", "batch_wait_s", "api_token", "auth",
                        "max_images", "max_request_mb", "body_timeout_s", "max_megapixels", "label_studio_url",
                        "label_studio_token", "draining", "max_requests_per_client",
                        "failover_s"})


@dataclass
class ServeSettings:
    model: str = ""  # registry root (follows its current version) or a model version directory
    version: str | None = None  # pin a registry version instead of following CURRENT
    api_token: str | None = None  # bearer token clients must send (also Label Studio's basic-auth password)
    auth: bool = True  # off only for local demos
    max_images: int = 64  # per request
    max_request_mb: float = 200.0
    body_timeout_s: float = 30.0  # a request's body must be complete this long after it starts (else 408)
    max_requests_per_client: int = 32  # in flight per client address and replica (else 429): no client fills a replica
    max_megapixels: float = 50.0  # per image: decompression-bomb guard
    max_event_mb: float = 16.0  # per Label Studio webhook event (a brush mask of a 20 MP image is a few MB)
    max_batch_size: int = 16  # images per model forward (@serve.batch)
    batch_wait_s: float = 0.01
    poll_s: float = 2.0  # how often the registry is checked for a new version / bank
    threads: int = 0  # torch threads per replica; 0 = all cores
    device: str = "auto"  # backbone device: auto (cuda when the replica has a GPU), cpu, cuda
    inbox: str | None = None  # Label Studio event spool; default <registry>/inbox
    label_studio_url: str | None = None
    label_studio_token: str | None = None
    allowed_roots: list[str] = field(default_factory=list)  # local folders JSON requests may name
    # the live labeling loop, run beside the scorer when ``loop_state`` is set (see labeling/live.py)
    loop_state: str | None = None  # the labeling setup's folder (`defectloop label init --state` / `up`)
    retrain_after: int = 20  # new confirmed masks that start a retraining
    reconcile_s: float = 120.0  # how often the polling sync looks for what the webhooks missed
    hold_back: float = 0.2  # share of confirmed labels a retraining leaves out, to be judged on
    ray_dashboard: str | None = None  # submit retrainings there (Ray Jobs API); else child processes
    failover_s: float = 30.0  # how long the gateway sends a request again while scorer replicas die (a restart takes ~10 s)
    draining: bool = False  # shutting down: new requests get 503 while those in flight finish (set on SIGTERM)

    @classmethod
    def load(cls, file: str | Path | None = None, env: dict[str, str] | None = None, **overrides) -> ServeSettings:
        env = dict(os.environ if env is None else env)
        data: dict = {}
        file = file or env.get("DEFECTLOOP_SERVE_CONFIG")
        if file:
            data.update(yaml.safe_load(Path(file).read_text()) or {})
        data.update({"label_studio_url": env.get("LABEL_STUDIO_URL"),
                     "label_studio_token": env.get("LABEL_STUDIO_API_KEY")} if env.get("LABEL_STUDIO_URL") else {})
        types = {f.name: f.type for f in fields(cls)}
        for name in types:
            value = env.get(f"DEFECTLOOP_{name.upper()}")
            if value is not None:
                data[name] = _parse(value, types[name])
        data.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise ValueError(f"unknown scorer settings: {', '.join(unknown)}")
        settings = cls(**data)
        settings.check()
        return settings

    def updated(self, changes: dict) -> ServeSettings:
        bad = sorted(set(changes) - RELOADABLE)
        if bad:
            raise ValueError(f"settings that need a restart, not a reconfigure: {', '.join(bad)}")
        new = ServeSettings(**{**asdict(self), **changes})
        new.check()
        return new

    def check(self) -> None:
        if not self.model:
            raise ValueError("no model to serve: set `model` (DEFECTLOOP_MODEL, --model or --registry)")
        if self.auth and not self.api_token:
            raise ValueError("auth is on but no API token is set (DEFECTLOOP_API_TOKEN); "
                             "use auth: false only for a local demo")
        if self.max_batch_size < 1 or self.max_images < 1 or self.max_requests_per_client < 1:
            raise ValueError("max_batch_size, max_images and max_requests_per_client must be >= 1")

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)

    def torch_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def inbox_dir(self) -> Path:
        """Local folder of the event inbox: ``inbox`` or beside a local registry (else in the cache)."""
        if self.inbox:
            return Path(self.inbox)
        if self.model.startswith("s3://"):
            from defectloop.store import CACHE_DIR

            return CACHE_DIR / "inbox"
        root = Path(self.model)
        return (root if (root / "versions").is_dir() else root.parent) / "inbox"


def _parse(value: str, typ: object) -> object:
    t = str(typ)
    if "bool" in t:
        return value.strip().lower() in ("1", "true", "yes", "on")
    if "list" in t:
        return [v for v in value.split(os.pathsep) if v]
    if t.startswith("int"):
        return int(value)
    if t.startswith("float"):
        return float(value)
    if value.startswith(("{", "[")):
        return json.loads(value)
    return value
