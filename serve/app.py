"""The Ray Serve application: the ``Gateway`` ingress (``serve.gateway``: auth, body limits,
failover) in front of the ``Scorer`` replicas, which run the FastAPI app of ``serve.api``.

    serve run defectloop.serve.app:app            # settings from DEFECTLOOP_* / DEFECTLOOP_SERVE_CONFIG
    serve deploy serve/config.yaml                 # settings as builder args + user_config
    defectloop serve --registry DIR --port 8000    # local Ray, foreground, Ctrl-C to stop

Requests for single images are gathered into batches by ``@serve.batch`` (``max_ongoing_requests``
is set well above the batch size, or Serve would never fill a batch). The model follows its
registry: a new current version or a new abnormal-bank update is loaded beside the old one and
swapped in; ``reconfigure`` (Serve ``user_config``) changes the model location, pin or limits
without restarting the replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time

import torch
from fastapi import HTTPException
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from defectloop.data.tiles import Grid
from defectloop.labeling.inbox import EventInbox
from defectloop.scoring import ModelHandle, Scored
from defectloop.serve.api import build_app
from defectloop.serve.context import ScoringContext
from defectloop.serve.gateway import Answer, call_asgi, gateway_app
from defectloop.serve.loop import LoopService
from defectloop.serve.settings import ServeSettings

log = logging.getLogger(__name__)

MAX_ONGOING = 128


@serve.deployment(max_ongoing_requests=MAX_ONGOING, health_check_period_s=10, graceful_shutdown_timeout_s=20)
class Scorer:
    def __init__(self, loop: DeploymentHandle | None = None, **settings):
        self.settings = ServeSettings.load(**settings)
        self.loop = loop  # the live loop's deployment, when the application runs one
        torch.set_num_threads(self.settings.threads or os.cpu_count() or 1)
        self.handle = ModelHandle(self.settings.model, self.settings.version, self.settings.torch_device())
        log.info("scorer: serving %s on %s", self.handle.served.label, self.handle.device)  # load now: fail at start, not per request
        self.handle.watch(self.settings.poll_s)
        self.ctx = ScoringContext(self.handle, self.score_one, self.settings, EventInbox(self.settings.inbox_dir()),
                                  loop_status=self.loop_status if loop is not None else None)
        self._apply_batching()
        self.app = build_app(self.ctx)

    async def respond(self, scope: dict, body: bytes) -> Answer:
        """One HTTP request, relayed by the gateway."""
        return await call_asgi(self.app, scope, body)

    def _apply_batching(self) -> None:
        self.score_one.set_max_batch_size(self.settings.max_batch_size)
        self.score_one.set_batch_wait_timeout_s(self.settings.batch_wait_s)

    def reconfigure(self, user_config: dict) -> None:
        """Apply a Serve ``user_config`` in place: in-flight requests finish on the model they started with."""
        old = self.settings
        self.settings = old.updated(user_config or {})
        self.ctx.settings = self.settings
        self._apply_batching()
        if (self.settings.model, self.settings.version) != (old.model, old.version):
            handle = ModelHandle(self.settings.model, self.settings.version, self.settings.torch_device())
            log.info("scorer: loaded %s", handle.served.label)  # before swapping: a bad location raises, the old model stays
            self.handle.stop()
            self.handle = self.ctx.handle = handle
        self.handle.watch(self.settings.poll_s)
        log.info("scorer reconfigured: %s", sorted(user_config or {}))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=2)
    async def score_one(self, items: list[tuple[torch.Tensor, str | None, Grid]]) -> list[Scored]:
        """(image's tiles, category, their grid) of many requests, scored as one batch.

        Two batches at a time: with one, the cores idled while a batch's answers went back and
        the next requests came in and were decoded (16 clients, batches of 16, the dev test mix
        with tiles: 1.1 of 2 cores busy, 9.1-10.0 img/s); with two, one is scored while the next
        forms (1.8 cores, 12.0 img/s)."""
        # in a thread: the replica's event loop keeps accepting requests (the next batch) meanwhile
        return await asyncio.to_thread(self.handle.score, [t for t, _, _ in items], [c for _, c, _ in items],
                                       [g for _, _, g in items])

    async def loop_status(self) -> dict:
        return await self.loop.status.remote()

    def check_health(self) -> None:
        if self.handle._served is None:
            raise RuntimeError("no model loaded")


@serve.deployment(max_ongoing_requests=2 * MAX_ONGOING, health_check_period_s=10, graceful_shutdown_timeout_s=30)
@serve.ingress()
class Gateway:
    """The HTTP ingress: gates a request, reads its body, and has a scorer replica answer it; when
    that replica dies mid-request, another one (or its replacement) gets it, for ``failover_s``."""

    def __init__(self, scorer: DeploymentHandle, **settings):
        self.scorer = scorer
        self.settings = ServeSettings.load(**settings)

    def reconfigure(self, user_config: dict) -> None:
        self.settings = self.settings.updated(user_config or {})

    def drain(self) -> tuple[str, int]:
        """From now on answer every request 503 (the service is stopping); this replica's id, and
        how many requests it has taken (past the gates) that have yet to be answered."""
        self.settings = self.settings.updated({"draining": True})
        return serve.get_replica_context().replica_id.unique_id, self.gate.taken

    async def forward(self, scope: dict, body: bytes) -> Answer:
        deadline, tries = asyncio.get_running_loop().time() + self.settings.failover_s, 0
        while True:
            tries += 1
            try:
                return await self.scorer.respond.remote(scope, body)
            except RayActorError as e:  # the replica died (or is unreachable) before it answered
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    log.error("gateway: %s %s: no scorer replica answered within %g s (%d tries)",
                              scope.get("method"), scope.get("path"), self.settings.failover_s, tries)
                    raise HTTPException(503, "no scorer replica is available: retry shortly",
                                        headers={"Retry-After": "5"}) from e
                log.warning("gateway: a scorer replica died under %s %s (%s): sending it again",
                            scope.get("method"), scope.get("path"), type(e).__name__)
                await asyncio.sleep(min(0.05 * 2**tries, 1.0, left))

    def __serve_build_asgi_app__(self):
        self.gate = gateway_app(self.forward, lambda: self.settings)
        return self.gate


def build(args: dict) -> serve.Application:
    """Application builder for ``serve deploy``: ``args`` are settings (see ``ServeSettings``); with a
    ``loop_state`` the live labeling loop runs beside the scorer."""
    return application(args or {})


def default_replicas(cpus: int | None = None) -> int:
    """Scorer replicas when none are asked for: two where there are 4 cores or more (one keeps
    scoring while the other restarts), else one (two on 2 cores would halve each one's threads and
    leave no core to the HTTP proxy and the live loop)."""
    return 2 if (cpus or os.cpu_count() or 1) >= 4 else 1


def application(args: dict, replicas: int | None = None, gpus: float = 0.0) -> serve.Application:
    """The scorer (``default_replicas`` unless told), plus the live loop when the settings name a
    labeling setup (``loop_state``). Replicas share the cores: each gets its part as torch threads
    unless ``threads`` is set."""
    replicas = replicas or default_replicas()
    if replicas > 1 and not args.get("threads"):
        args = {**args, "threads": max(1, (os.cpu_count() or 1) // replicas)}
    settings = ServeSettings.load(**args)
    scorer = Scorer.options(num_replicas=replicas, ray_actor_options={"num_gpus": gpus, "num_cpus": 1})
    if settings.loop_state:
        scorer = scorer.bind(loop=LoopService.options(ray_actor_options={"num_cpus": 0.5}).bind(**args), **args)
    else:
        scorer = scorer.bind(**args)
    # the gateway relays and waits: no core of its own (it would take one from scoring)
    return Gateway.options(num_replicas=replicas, ray_actor_options={"num_cpus": 0}).bind(scorer, **args)


app = Gateway.bind(Scorer.bind())


def drain_gateways(replicas: int, within_s: float = 10.0) -> int:
    """Have every gateway replica answer 503 from now on; the requests they had taken then, which
    Serve lets them finish (``graceful_shutdown_timeout_s``) once the application is deleted.

    A handle call reaches one replica, so call until each has answered (or ``within_s``: one missed
    keeps taking requests until the route is withdrawn, and Serve still lets it finish them). Not a
    ``user_config`` change: ``serve.run`` versions a deployment anew each time, so that would restart
    every replica just to stop it. A request the proxy has not yet routed when the route goes is
    answered 404 by the proxy: no replica took it."""
    handle = serve.get_deployment_handle("Gateway", "defectloop")
    taken: dict[str, int] = {}
    deadline = time.monotonic() + within_s
    while len(taken) < replicas and (left := deadline - time.monotonic()) > 0:
        try:
            replica, n = handle.drain.remote().result(timeout_s=left)
            taken.setdefault(replica, n)  # the first answer: later ones come after the gate closed
        except Exception as e:  # a replica dying or slow to answer: the application is deleted all the same
            log.warning("draining a gateway replica: %s", e)
    log.info("draining %d of %d gateway replicas: %d requests in flight finish first",
             len(taken), replicas, sum(taken.values()))
    return sum(taken.values())


def run_foreground(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
                   ray_address: str | None = None, replicas: int | None = None, gpus: float = 0.0) -> None:
    """Start (or join) Ray, deploy the scorer on ``host:port`` and block until SIGINT/SIGTERM."""
    import dataclasses

    import ray

    ray.init(address=ray_address, include_dashboard=False, log_to_driver=True,
             logging_level=logging.WARNING, configure_logging=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own (aborting) handler
        signal.signal(sig, lambda *_: stop.set())
    args = dataclasses.asdict(settings)
    replicas = replicas or default_replicas()
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(args, replicas, gpus), name="defectloop", route_prefix="/")
        print(f"defectloop scorer on http://{host}:{port}  (docs: http://{host}:{port}/docs; "
              f"Label Studio ML backend URL: http://{host}:{port}/ls); Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
        print("shutting down the scorer: finishing the requests in flight...", flush=True)
        # first the gateways answer new requests 503, then the application goes: its replicas finish
        # what is in flight (graceful_shutdown_timeout_s) while the proxy still holds the connections.
        # Tearing Serve down at once dropped them ("server disconnected without sending a response").
        drain_gateways(replicas)
        serve.delete("defectloop")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
