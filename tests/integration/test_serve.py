"""The scorer over real HTTP: Ray Serve on local Ray, started by ``defectloop serve``."""

import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from defectloop.memory import Provenance
from defectloop.registry import Registry

pytestmark = pytest.mark.slow
AUTH = {"Authorization": "Bearer integration-token"}  # the scorer fixture's token


@pytest.fixture(scope="module")
def images(tiny_data):
    paths = sorted(tiny_data.glob("*/test/*/*.png"))
    return {"good": [p.read_bytes() for p in paths if p.parent.name == "good"],
            "bad": [p.read_bytes() for p in paths if p.parent.name != "good"]}


def score(url, data: bytes, **params) -> httpx.Response:
    return httpx.post(f"{url}/v1/score", files=[("files", ("x.png", data, "image/png"))], params=params,
                      headers=AUTH, timeout=60)


def test_scores_over_http(scorer, images):
    r = score(scorer.url, images["bad"][0], mask="true", heatmap="true")
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["decision"] == "anomalous" and res["mask"]["pixels"] > 0 and res["heatmap_png"]
    good = [score(scorer.url, g).json()["results"][0]["score"] for g in images["good"][:4]]
    bad = [score(scorer.url, b).json()["results"][0]["score"] for b in images["bad"][:4]]
    assert min(bad) > max(good)
    assert httpx.post(f"{scorer.url}/v1/score", files=[("files", ("x.png", b"junk", "image/png"))],
                      headers=AUTH).status_code == 400
    assert httpx.get(f"{scorer.url}/v1/model").status_code == 401
    assert httpx.get(f"{scorer.url}/docs").status_code == 200


def test_a_49_megapixel_image_raises_the_replica_memory_by_under_1_gb(scorer, tmp_path):
    """It is reduced as it is read (the model sees 256 px), and its mask and heatmap are made at its
    size as bytes: before, a 49 MP PNG with a heatmap raised the replica by 2.9 GB."""
    import io

    import numpy as np
    from PIL import Image

    w, h = 8100, 6050
    row = (np.arange(w) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.broadcast_to(row[None, :, None], (h, w, 3))).save(buf, format="PNG", compress_level=1)
    score(scorer.url, _small_png(), mask="true", heatmap="true")  # the replica warm: its first request's allocations are not the image's
    before = httpx.get(f"{scorer.url}/v1/model", headers=AUTH).json()["peak_memory_mb"]
    r = score(scorer.url, buf.getvalue(), mask="true", heatmap="true")
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert (res["width"], res["height"]) == (w, h) and res["heatmap_png"]
    raised = httpx.get(f"{scorer.url}/v1/model", headers=AUTH).json()["peak_memory_mb"] - before
    print(f"49 MP image: replica peak memory raised by {raised:.0f} MB")
    assert raised < 1024, f"a 49 MP image raised the replica's peak memory by {raised:.0f} MB"


def _small_png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_concurrent_requests_are_batched_correctly(scorer, images):
    """16 clients at once: every answer belongs to its own image (batching must not mix them up)."""
    data = images["good"][:8] + images["bad"][:8]
    alone = [score(scorer.url, d).json()["results"][0]["score"] for d in data]
    with ThreadPoolExecutor(len(data)) as pool:
        together = list(pool.map(lambda d: score(scorer.url, d).json()["results"][0]["score"], data))
    assert together == pytest.approx(alone, abs=1e-3)


def test_hot_reload_under_load(scorer, scorer_registry, images, embedder):
    """A bank update and a new version are picked up while 4 clients keep scoring: no request fails."""
    reg = Registry(scorer_registry)
    start_label = reg.label()
    stop = threading.Event()
    seen: Counter = Counter()
    errors: list[str] = []

    def client(k):
        with httpx.Client(timeout=60, headers=AUTH) as c:
            while not stop.is_set():
                r = c.post(f"{scorer.url}/v1/score", files=[("files", ("x.png", images["bad"][k], "image/png"))])
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                else:
                    body = r.json()
                    bank = body["bank_version"]
                    seen[body["model_version"] if bank == "b0000" else f"{body['model_version']}-{bank}"] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()

    def wait_for(label, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and seen[label] < 3:
            time.sleep(0.2)
        return seen[label]

    try:
        time.sleep(1)
        model = reg.load()
        model.abnormal_bank.add(Provenance("it-ann-1", "img-x", "disc", "scratch"), model.abnormal_bank.tensors()[0][:5])
        bank_label = reg.publish_bank(model)
        assert wait_for(bank_label) >= 3
        version = reg.register(reg.load())
        assert wait_for(version) >= 3
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert seen[start_label] > 0
    info = httpx.get(f"{scorer.url}/v1/model", headers=AUTH).json()
    assert info["model_version"] == version and info["reload_error"] is None


def test_serve_deploy_config_on_a_ray_head(ray_head, scorer_registry, images, tmp_path):
    """serve/config.yaml deployed with `serve deploy` (the builder and its args), then a user_config
    change applied in place: the replica keeps its loaded model (no restart) and answers throughout."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[2] / "serve" / "config.yaml").read_text())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    app["args"]["model"] = str(scorer_registry)
    app["runtime_env"]["env_vars"].update(DEFECTLOOP_API_TOKEN="deploy-token", OMP_NUM_THREADS="1")
    dep = app["deployments"][0]
    dep["ray_actor_options"]["num_cpus"] = 1
    dep["num_replicas"] = 1  # one, so that /v1/model always answers from the replica whose load time is compared
    serve_exe = str(Path(sys.executable).with_name("serve"))

    def deploy():
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        subprocess.run([serve_exe, "deploy", str(path), "-a", ray_head.url], check=True, capture_output=True)

    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer deploy-token"}
    deploy()
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "serve deploy did not come up"
        time.sleep(1)
    try:
        loaded = httpx.get(f"{url}/v1/model", headers=auth).json()["loaded_at"]
        dep["user_config"]["max_batch_size"] = 4
        dep["user_config"]["poll_s"] = 1.0
        deploy()
        for _ in range(10):
            r = httpx.post(f"{url}/v1/score", files=[("files", ("x.png", images["bad"][0], "image/png"))],
                           headers=auth, timeout=60)
            assert r.status_code == 200, r.text
            time.sleep(0.3)
        assert httpx.get(f"{url}/v1/model", headers=auth).json()["loaded_at"] == loaded
    finally:
        subprocess.run([serve_exe, "shutdown", "-a", ray_head.url, "-y"], capture_output=True)



def test_stalled_connections_without_a_token_take_nothing_down(scorer, images):
    """200 clients send a request's headers, announce a body and stall: without the token each gets
    its 401 before any body is read, so they hold no replica slot; scoring and health answer on. With
    the token, a stalled body is cut after body_timeout_s (408)."""
    import socket

    port = int(scorer.url.rsplit(":", 1)[1])
    stalled = []
    try:
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            path = ("/v1/score", "/ls/webhook", "/ls/predict", "/ls/setup")[i % 4]  # the last two: FastAPI reads their bodies first
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: 100000000\r\n\r\n{{".encode())
            stalled.append(s)
        t0 = time.monotonic()
        assert httpx.get(f"{scorer.url}/v1/health", timeout=10).status_code == 200
        health_s = time.monotonic() - t0
        t0 = time.monotonic()
        r = score(scorer.url, images["bad"][0])
        score_s = time.monotonic() - t0
        assert r.status_code == 200, r.text
        print(f"under 200 stalled connections: health {health_s:.2f} s, score {score_s:.2f} s")
        assert health_s <= 2 and score_s <= 5, (health_s, score_s)
        answered = sum(b"401" in s.recv(64) for s in stalled[:20])  # the gate's answer, without the body
        assert answered == 20
        # with the token, a body that stalls is cut at the scorer's body_timeout_s (5 s here): 408
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        stalled.append(slow)
        t0 = time.monotonic()
        slow.sendall(f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{".encode())
        assert b" 408 " in slow.recv(64) and 4 < time.monotonic() - t0 < 15
    finally:
        for s in stalled:
            s.close()


def scorer_replica_pids(server_pid: int) -> set[int]:
    """PIDs of the scorer replicas of the service ``server_pid`` runs (Ray names a replica's process
    after it; the local Ray it started, and so its workers, are its descendants)."""
    from pathlib import Path

    from defectloop.process import descendants

    pids = set()
    for pid, _ in descendants(server_pid):
        try:
            if b"ServeReplica:defectloop:Scorer" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.add(pid)
        except OSError:  # gone meanwhile
            pass
    return pids


def test_replica_faults_lose_no_request(scorer_registry, images, tmp_path):
    """Two scorer replicas under 8 clients: one SIGKILLed gives no failed request (the gateway sends
    what it had in flight to the other), and the p99 stays under 5 s. Then SIGTERM of the service
    drains: every request a replica had taken is answered 200; later ones get 503 or find it gone."""
    import os
    import signal
    import sys

    from defectloop.process import ManagedProcess, free_port

    port = free_port()
    server = ManagedProcess("replicas", [sys.executable, "-m", "defectloop.cli", "serve", "--registry",
                                         str(scorer_registry), "--port", str(port), "--replicas", "2"],
                            {**os.environ, "DEFECTLOOP_API_TOKEN": AUTH["Authorization"].split()[1],
                             "DEFECTLOOP_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"},
                            f"http://127.0.0.1:{port}", tmp_path / "replicas.log")
    server.start().wait_ready("/v1/health", 180)
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 60
        while len(replicas := scorer_replica_pids(server.pid)) < 2:
            assert time.monotonic() < deadline, f"2 scorer replicas did not start: {replicas}"
            time.sleep(0.5)
        outcomes: list[tuple[float, float, int | str]] = []  # (sent, answered, status or error)
        signal_at = [float("inf")]

        files = [("files", (f"{i}.png", d, "image/png")) for i, d in enumerate((images["bad"] * 8)[:8])]

        def client() -> None:  # 8 images a request: the killed replica has requests mid-way
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = httpx.post(f"{server.url}/v1/score?heatmap=true&mask=true", headers=AUTH, files=files,
                                   timeout=60)
                    outcomes.append((t0, time.monotonic(), r.status_code))
                except httpx.ConnectError:  # the service is gone (after SIGTERM): nothing was taken
                    return
                except httpx.HTTPError as e:
                    outcomes.append((t0, time.monotonic(), type(e).__name__))
                    if t0 > signal_at[0]:
                        return

        clients = [threading.Thread(target=client, daemon=True) for _ in range(8)]
        for c in clients:
            c.start()
        time.sleep(4)
        victim = min(replicas)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        deadline = killed_at + 120  # Serve starts a replacement: clients go on until it serves
        while len(scorer_replica_pids(server.pid) - {victim}) < 2:
            assert time.monotonic() < deadline, "no replacement for the killed scorer replica"
            time.sleep(0.5)
        time.sleep(3)
        during = [o for o in outcomes if o[1] >= killed_at]
        failed = [o for o in outcomes if o[2] != 200]
        latency = sorted(t1 - t0 for t0, t1, _ in during)
        p99 = latency[int(0.99 * (len(latency) - 1))]
        span = outcomes[-1][1] - killed_at
        print(f"SIGKILL of a scorer replica under 8 clients: {len(during)} requests answered after it in "
              f"{span:.1f} s ({len(during) / span:.1f} req/s), {len(failed)} failed, p99 {p99:.2f} s, "
              f"max {latency[-1]:.2f} s")
        assert not failed, failed
        assert p99 < 5, f"p99 {p99:.2f} s during the replica kill"

        # SIGTERM under load: the requests the gateways had taken when they closed finish (200); the
        # others get 503 at a gateway (Retry-After), 404 from the proxy once the route is withdrawn
        # (no replica took them: under load the proxy may not have routed one sent just before), or
        # find the proxy closed; none gets another 5xx
        signal_at[0] = time.monotonic()
        assert server.stop() == 0
        stop.set()
        for c in clients:
            c.join(60)
        drained = re.search(r"draining (\d+) of 2 gateway replicas: (\d+) requests in flight", server.log.read_text())
        assert drained and drained[1] == "2", f"the gateways were not drained: {server.tail()}"
        after = [o for o in outcomes if o[1] >= signal_at[0]]
        finished = [o for o in after if o[2] == 200]
        print(f"SIGTERM: {drained[2]} requests in flight at the gateways, {len(finished)} answered 200 after it")
        assert len(finished) >= int(drained[2]), f"taken {drained[2]}, finished {len(finished)}: {after}"
        assert not [o for o in after if isinstance(o[2], int) and o[2] not in (200, 404, 503)], after
        assert not [o for o in after if o[0] < signal_at[0] and not isinstance(o[2], int)], after
    finally:
        stop.set()
        assert server.stop() is not None


def test_a_fifo_uri_and_bad_webhooks_over_http(scorer, images):
    """Over the real service: a FIFO named by a JSON request gets 400 at once (reading it would
    block a thread for ever), and scoring goes on; a webhook event over max_event_mb (16) gets 413,
    a malformed one 4xx, and one delivered twice is stored once."""
    import os

    pipe = scorer.uris / "pipe.png"
    os.mkfifo(pipe)
    t0 = time.monotonic()
    r = httpx.post(f"{scorer.url}/v1/score", json={"images": [{"uri": str(pipe)}]}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and time.monotonic() - t0 < 5, r.text
    assert score(scorer.url, images["bad"][0]).status_code == 200
    hook = f"{scorer.url}/ls/webhook"
    big = {"action": "ANNOTATION_CREATED", "annotation": {"id": 9, "task": 1, "result": [{"x": "y" * 17 * 2**20}]}}
    assert httpx.post(hook, json=big, headers=AUTH, timeout=60).status_code == 413
    for payload in (b"[1, 2]", b"{\"no_action\": 1}", b"{broken"):
        r = httpx.post(hook, content=payload, headers={**AUTH, "content-type": "application/json"}, timeout=30)
        assert r.status_code in (400, 422), (payload, r.status_code)
    event = {"action": "ANNOTATION_CREATED", "annotation": {"id": 77, "task": 1, "result": []}}
    first, again = (httpx.post(hook, json=event, headers=AUTH, timeout=30) for _ in range(2))
    assert first.status_code == again.status_code == 201 and first.json()["event_id"] == again.json()["event_id"]
