"""Every manifest in infra/ and serve/ parses and points at things that exist in the code."""

import importlib
import re
import shlex
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from defectloop.cli import build_parser
from defectloop.serve.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[2]
CODE = "\n".join(p.read_text() for p in [*ROOT.glob("platform/defectloop/**/*.py"), *ROOT.glob("serve/*.py")])


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def check_serve_config(cfg: dict) -> None:
    """A Serve config: the import path resolves, args and user_config are real settings, the deployment exists."""
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(cfg)  # Ray's own schema for `serve deploy` / serveConfigV2
    names = {f.name for f in fields(ServeSettings)}
    for app in cfg["applications"]:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        assert callable(builder)
        assert set(app.get("args", {})) <= names, app["args"]
        assert [d["name"] for d in app["deployments"]] == ["Scorer", "Gateway"]
        for dep in app["deployments"]:
            assert set(dep.get("user_config", {})) <= names
        scorer = app["deployments"][0]
        assert scorer.get("max_ongoing_requests", 0) >= scorer.get("user_config", {}).get("max_batch_size", 16)


def check_env(env: dict[str, str]) -> None:
    for name in env:
        if name.startswith("DEFECTLOOP_"):
            field = name.removeprefix("DEFECTLOOP_").lower()
            assert field in {f.name for f in fields(ServeSettings)} or name in CODE, name
        elif name.startswith(("AWS_", "LABEL_STUDIO_")) and name not in (
                "LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN"):
            assert name in CODE or name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), name


def check_command(command: str) -> None:
    argv = shlex.split(command)
    if argv[0] == "defectloop":
        build_parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown flag


def test_serve_config_yaml():
    check_serve_config(yaml.safe_load((ROOT / "serve" / "config.yaml").read_text()))


def test_compose_file():
    compose = yaml.safe_load((ROOT / "infra" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"label-studio", "minio", "ray-head", "ray-worker", "scorer"} <= set(services)
    example = dict(line.split("=", 1) for line in (ROOT / "infra" / "compose.env.example").read_text().split())
    text = (ROOT / "infra" / "compose.yaml").read_text()
    assert set(re.findall(r"\$\{(\w+)\}", text)) <= set(example)  # every variable has an example value
    for svc in services.values():
        check_env(svc.get("environment", {}))
        if "command" in svc:
            check_command(svc["command"])
        if svc.get("build"):
            assert (ROOT / "infra" / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    scorer = shlex.split(services["scorer"]["command"])
    assert f"{scorer[scorer.index('--port') + 1]}:" in services["scorer"]["ports"][0]
    assert services["scorer"]["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "9000:9000" in services["minio"]["ports"]
    assert services["scorer"]["environment"]["LABEL_STUDIO_URL"].endswith(":8080")
    assert "8080:8080" in services["label-studio"]["ports"]


def test_rayservice_manifest():
    (doc,) = load_all(ROOT / "infra" / "k8s" / "rayservice-scorer.yaml")
    assert doc["kind"] == "RayService" and doc["apiVersion"] == "ray.io/v1"
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    check_serve_config(serve_cfg)
    dep = serve_cfg["applications"][0]["deployments"][0]
    assert dep["autoscaling_config"]["max_replicas"] > dep["autoscaling_config"]["min_replicas"]
    check_ray_cluster(doc["spec"]["rayClusterConfig"])
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert 8000 in [p["containerPort"] for p in head["ports"]]


def test_dockerfile_installs_the_project():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    for folder in ("platform", "serve", "workers"):
        assert f"COPY {folder} ./{folder}" in text
    assert "pip install ." in text and "python:3.11" in text


def test_a_bad_command_would_be_caught():
    with pytest.raises(SystemExit):
        check_command("defectloop serve --registry x --no-such-flag")


def check_ray_cluster(spec: dict) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    for c in containers:
        assert c["image"].startswith("defectloop:")
        check_env({e["name"]: e.get("value") for e in c.get("env", [])})
    head = containers[0]
    assert {6379, 8265} <= {p["containerPort"] for p in head["ports"]}


def test_rayjob_runs_the_retraining_entry_point_on_gpus():
    from defectloop.workers.retrain import build_parser as retrain_parser

    (doc,) = load_all(ROOT / "infra" / "k8s" / "rayjob-retrain.yaml")
    assert doc["kind"] == "RayJob"
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "defectloop.workers.retrain"]
    importlib.import_module(argv[2])
    args = retrain_parser().parse_args(argv[3:])
    check_ray_cluster(doc["spec"]["rayClusterSpec"])
    gpu_group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert args.workers <= gpu_group["maxReplicas"] and args.gpus_per_worker <= float(gpus)


def test_rayjob_ingests_the_pool_on_the_cpu_workers():
    """The ingestion RayJob runs `defectloop ingest` as written (its flags parse), into an S3
    feature cache, with one backbone actor per worker pod: the head holds no CPU for actors."""
    (doc,) = load_all(ROOT / "infra" / "k8s" / "rayjob-ingest.yaml")
    assert doc["kind"] == "RayJob"
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["defectloop", "ingest"]
    args = build_parser().parse_args(argv[1:])
    assert args.func.__name__ == "cmd_ingest" and args.cache.startswith("s3://") and args.pool.startswith("s3://")
    cluster = doc["spec"]["rayClusterSpec"]
    check_ray_cluster(cluster)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (workers,) = cluster["workerGroupSpecs"]
    assert float(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) == args.cpus_per_actor


def test_raycluster_manifest():
    (doc,) = load_all(ROOT / "infra" / "k8s" / "raycluster.yaml")
    assert doc["kind"] == "RayCluster"
    check_ray_cluster(doc["spec"])
    for line in (ROOT / "infra" / "k8s" / "raycluster.yaml").read_text().splitlines():
        if "defectloop retrain" in line:  # the commands in the comments are real
            command = line.split("defectloop", 1)[1].removesuffix("\\").strip()
            build_parser().parse_args([*shlex.split(command), "--registry", "r", "--data", "d"])



def test_two_scorer_replicas_where_the_cores_allow():
    from defectloop.serve.app import default_replicas

    assert [default_replicas(c) for c in (1, 2, 3, 4, 16)] == [1, 1, 1, 2, 2]
    deploy = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"][0]["deployments"][0]
    assert deploy["num_replicas"] == 2
    service = yaml.safe_load((ROOT / "infra" / "k8s" / "rayservice-scorer.yaml").read_text())
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["applications"][0]["deployments"][0]["autoscaling_config"]["min_replicas"] == 2
