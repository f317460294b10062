"""The whole labeling stack on one machine, started by one command (``defectloop up``).

    <state>/registry       model versions and bank updates (trained here if empty)
    <state>/label-studio   Label Studio's data (the project survives a restart of the stack)
    <state>/label          the labeling setup: project, cursor, ledger, quarantine, pool features
    <state>/stack.json     what clients need: URLs, tokens, project id (and this process's pid)

Local Ray (with its dashboard on 127.0.0.1, for retrainings as Ray jobs) or a cluster
(``--ray-address``), Label Studio, and the Serve application: the scorer, the Label Studio ML
backend and the live loop. Stopping the ``up`` process (Ctrl-C, SIGTERM, ``defectloop down``)
stops everything it started.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from defectloop.data import Sample, load_split
from defectloop.data.images import IMAGE_SUFFIXES
from defectloop.labeling.project import LabelingProject, PoolImage
from defectloop.labeling.server import label_studio
from defectloop.labeling.workspace import Workspace, open_loop
from defectloop.process import ManagedProcess, free_port, ray_head
from defectloop.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class StackConfig:
    state: Path
    data: Path | None = None  # MVTec layout (*/train/good trains, */test/** is the pool) or a folder of images
    ray_address: str | None = None  # a Ray cluster; default: a local one, ended with the stack
    port: int = 0  # the scorer's HTTP port (0: a free one)
    label_studio_port: int = 0
    policy: str = "adaptive"
    batch: int = 20
    retrain_after: int = 20
    reconcile_s: float = 120.0
    replicas: int | None = None  # scorer replicas (default: serve.app.default_replicas)
    model: dict | None = None  # settings of the first model (ModelConfig.from_dict), default: the defaults
    label_studio_url: str | None = None  # use this Label Studio instead of starting one
    label_studio_token: str | None = None  # its token (default: LABEL_STUDIO_API_KEY)
    title: str = "defectloop"  # of the Label Studio project
    document_root: Path | None = None  # the attached Label Studio's LOCAL_FILES_DOCUMENT_ROOT (default: that variable)
    feature_cache: str | None = None  # a feature cache by image content (`defectloop ingest`), folder or s3://


def pool_of(data: Path) -> tuple[list[PoolImage], list[Sample], bool]:
    """(the unlabeled pool, the normal images the first model trains on, whether it is MVTec layout).

    MVTec layout: every image under */test/ is in the pool, */train/good trains. A plain folder: its
    images are the pool, and the first model trains on them too (production images are mostly
    normal; the loop corrects the rest)."""
    tests = sorted(p for p in data.glob("*/test/**/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if tests:
        pool = [PoolImage(str(p), p.relative_to(data).parts[0], p.relative_to(data).as_posix()) for p in tests]
        return pool, load_split(data).train, True
    images = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{data}: no images (expected MVTec layout or a folder of images)")
    pool = [PoolImage(str(p), p.relative_to(data).parts[0] if len(p.relative_to(data).parts) > 1 else "default",
                      p.relative_to(data).as_posix()) for p in images]
    return pool, [Sample(Path(img.uri), img.category) for img in pool], False


def neutral_pool(pool: list[PoolImage], folder: Path) -> list[PoolImage]:
    """The pool under names that say nothing of the defect (``<category>/<hash>.png``), as hard links
    to the images (copies across file systems): a task's image URL and source must not give the
    answer away to the annotator. The path relative to the data folder stays in each task's meta."""
    out = []
    for img in pool:
        # the file itself: link(2) does not follow a symlink (the demo's data folder is of links), and a
        # link to a link outside Label Studio's document root is refused there
        src = Path(img.uri).resolve()
        name = hashlib.sha256((img.path or img.uri).encode()).hexdigest()[:16] + src.suffix.lower()
        dst = folder / img.category / name
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:  # another file system
                shutil.copy2(src, dst)
        out.append(PoolImage(str(dst), img.category, img.path))
    return out


def initial_model(registry: Registry, train: list[Sample], settings: dict | None = None) -> str:
    """Train and register the first model (unsupervised DMAD by default) when the registry has none."""
    from defectloop.models import Fitter, ModelConfig, create_model

    if registry.current():
        return registry.current()
    model = create_model(ModelConfig.from_dict(settings or {}))
    print(f"training the first model on {len(train)} normal images...", flush=True)
    Fitter(model).fit_samples(train, progress=True)
    return registry.register(model)


class Stack:
    def __init__(self, cfg: StackConfig):
        self.cfg = cfg
        self.state = cfg.state.resolve()
        self.label_studio: ManagedProcess | None = None
        self.ray: ManagedProcess | None = None
        self.info: dict = {}

    def data(self) -> Path:
        if self.cfg.data:
            return self.cfg.data.resolve()
        folder = self.state / "data"
        if not folder.is_dir():
            from defectloop.data.synthetic import make_dataset

            print("no --data: generating a data set with synthetic defects...", flush=True)
            make_dataset(folder, n_train=30, n_test_good=60, n_test_bad=8, size=256, seed=0)
        return folder

    def up(self) -> dict:
        import ray
        from ray import serve

        from defectloop.serve.app import application
        from defectloop.serve.settings import ServeSettings

        state, data = self.state, self.data()
        state.mkdir(parents=True, exist_ok=True)
        pool, train, mvtec = pool_of(data)
        registry = Registry(state / "registry")
        version = initial_model(registry, train, self.cfg.model)

        if self.cfg.label_studio_url:
            ls_url = self.cfg.label_studio_url.rstrip("/")
            ls_token = self.cfg.label_studio_token or os.environ.get("LABEL_STUDIO_API_KEY", "")
            if not ls_token:
                raise ValueError("--label-studio-url needs the token in LABEL_STUDIO_API_KEY")
            login = ("(your account)", "")
        else:
            self.label_studio = label_studio(state / "label-studio", state,
                                             port=self.cfg.label_studio_port or free_port())
            print("starting Label Studio (its first start migrates the database: about a minute)...", flush=True)
            ls = self.label_studio.start().wait_ready("/health", 600)
            ls_url, ls_token, login = ls.url, ls.token, (ls.user, ls.password)
        label_state = state / "label"
        ws = self._workspace(label_state, ls_url, ls_token, registry, data, neutral_pool(pool, state / "pool"), mvtec)
        print(f"embedding the pool ({len(pool)} images, once)...", flush=True)
        loop = open_loop(label_state, ls_token, ws, watch_scorer=False)
        loop.select()  # the first ranking, before the scorer is connected
        # the loop holds callbacks to itself (a reference cycle): collected now, its pool's features
        # (6 GB at 10,000 images) are freed before the live loop's replica loads its own copy
        del loop
        gc.collect()

        address = self.cfg.ray_address
        if not address:  # a head of our own, on 127.0.0.1: its dashboard takes the retrainings (Ray Jobs)
            self.ray = ray_head(tempfile.mkdtemp(prefix="dl-ray-"), os.cpu_count())
            print("starting Ray...", flush=True)
            self.ray.start().wait_ready("/api/version", 180)
            address = self.ray.address
            os.environ["RAY_AUTH_MODE"] = "disabled"
        # the replicas' logs (every request, every loop turn) stay in Ray's log folder: the console
        # is for what a person reads (progress, the table, warnings)
        context = ray.init(address=address, logging_level=logging.WARNING, configure_logging=True, log_to_driver=False)
        dashboard = context.dashboard_url
        if self.ray is not None:
            print(f"Ray's logs (scorer, live loop, retraining jobs): {self.ray.temp_dir}/session_latest/logs", flush=True)
        token = os.environ.get("DEFECTLOOP_API_TOKEN") or secrets.token_urlsafe(24)
        port = self.cfg.port or free_port()
        settings = ServeSettings.load(model=str(registry.location), api_token=token, label_studio_url=ls_url,
                                      label_studio_token=ls_token, loop_state=str(label_state), poll_s=0.5,
                                      retrain_after=self.cfg.retrain_after, reconcile_s=self.cfg.reconcile_s,
                                      ray_dashboard=f"http://{dashboard}" if dashboard else None)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines are for Ray's log folder
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        print("starting the Ray Serve application (scorer + live loop)...", flush=True)
        serve.run(application(asdict(settings), self.cfg.replicas), name="defectloop", route_prefix="/")
        serve_url = f"http://127.0.0.1:{port}"
        project = LabelingProject(ls_url, ls_token, ws.project_id)
        if not ws.scorer:
            project.connect_scorer(serve_url, token)
            ws.scorer = serve_url
            ws.save(label_state)
        self.info = {"label_studio_url": ls_url, "label_studio_token": ls_token, "project_id": ws.project_id,
                     "serve_url": serve_url, "api_token": token, "label_studio_user": login[0],
                     "label_studio_password": login[1], "model_version": version,
                     "ray_dashboard": f"http://{dashboard}" if dashboard else None, "pid": os.getpid(),
                     "data": str(data), "state": str(state)}
        tmp = state / ".stack.json.tmp"
        tmp.write_text(json.dumps(self.info, indent=1))
        os.replace(tmp, state / "stack.json")
        return self.info

    def _workspace(self, label_state: Path, url: str, token: str, registry: Registry, data: Path,
                   pool: list[PoolImage], mvtec: bool) -> Workspace:
        """The labeling setup: attached when it exists (and its project still does), else created."""
        if Workspace.path(label_state).is_file():
            ws = Workspace.load(label_state)
            try:
                LabelingProject(url, token, ws.project_id)
                ws.scorer = None  # the scorer's port is new: connect it again
                ws.feature_cache = self.cfg.feature_cache or ws.feature_cache
                return ws
            except Exception as e:  # noqa: BLE001 - the project is gone: make a new one
                log.warning("project %s of %s is gone (%s): creating a new one", ws.project_id, label_state, e)
        defects = sorted({Path(img.path).parts[2] for img in pool if img.path and len(Path(img.path).parts) > 3
                          and Path(img.path).parts[2] != "good"}) or ["defect"]
        project = LabelingProject.create(url, token, self.cfg.title, pool, defects, document_root=self.document_root(),
                                         policy=self.cfg.policy)
        ws = Workspace(url, project.id, str(registry.location), str(self.state / "pool"), self.cfg.policy, self.cfg.batch,
                       self.cfg.retrain_after, data=str(data) if mvtec else None,  # retrainings fit on */train
                       feature_cache=self.cfg.feature_cache)
        ws.save(label_state)
        return ws

    def document_root(self) -> Path:
        """Label Studio's LOCAL_FILES_DOCUMENT_ROOT: the state folder for a Label Studio of our own,
        else the one the attached Label Studio was given (the state folder must be below it)."""
        if self.label_studio is not None:
            return self.state
        root = self.cfg.document_root or os.environ.get("LOCAL_FILES_DOCUMENT_ROOT")
        if not root or not self.state.is_relative_to(Path(root).resolve()):
            raise ValueError(f"the stack's state folder {self.state} must be below the attached Label Studio's "
                             "LOCAL_FILES_DOCUMENT_ROOT (set it here too)")
        return Path(root).resolve()

    def wait(self, stop: threading.Event) -> None:
        print(f"\nLabel Studio: {self.info['label_studio_url']}  login {self.info['label_studio_user']} / "
              f"{self.info['label_studio_password']}  (project {self.info['project_id']})\n"
              f"scorer:       {self.info['serve_url']}/docs  (token {self.info['api_token']})\n"
              f"banks:        {self.info['serve_url']}/v1/banks\n"
              f"state:        {self.state}/stack.json\nCtrl-C (or `defectloop down --state {self.state}`) stops it all",
              flush=True)
        while not stop.wait(0.5):
            pass

    def down(self) -> None:
        import ray
        from ray import serve

        print("stopping the stack...", flush=True)
        try:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        finally:
            for proc in (self.ray, self.label_studio):
                if proc is not None:
                    proc.stop(60)
            if self.ray is not None:
                shutil.rmtree(Path(self.ray.log).parent, ignore_errors=True)
            (self.state / "stack.json").unlink(missing_ok=True)


def run(cfg: StackConfig) -> int:
    """``defectloop up``: start everything, serve until SIGINT/SIGTERM, stop what was started."""
    stack = Stack(cfg)
    stop = threading.Event()
    try:
        stack.up()
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own handlers
            signal.signal(sig, lambda *_: stop.set())
        stack.wait(stop)
    finally:
        stack.down()
    return 0


def down(state: Path, timeout: float = 120) -> int:
    """``defectloop down``: stop the stack whose ``up`` wrote ``<state>/stack.json``."""
    path = state / "stack.json"
    if not path.is_file():
        print(f"no stack is running from {state} (no stack.json)")
        return 1
    pid = json.loads(path.read_text())["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        path.unlink()
        print(f"the stack's process {pid} was gone already")
        return 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print("stopped")
            return 0
        time.sleep(0.5)
    print(f"process {pid} still runs after {timeout:.0f} s", flush=True)
    return 1
