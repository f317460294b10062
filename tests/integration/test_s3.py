"""Model versions, banks and pools on a real S3 server (seaweedfs), through boto3."""

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from defectloop import store as store_mod
from defectloop.cli import main
from defectloop.labeling.workspace import pool_images
from defectloop.memory import Provenance
from defectloop.registry import Registry
from defectloop.scoring import ModelHandle
from defectloop.store import S3Config, StoreError, open_store, read_uri
from defectloop.workers.train import arrow_filesystem

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "CACHE_DIR", tmp_path / "cache")


@pytest.fixture(scope="module")
def model(served_registry):
    return Registry(served_registry).load()


S3_BUCKET = "defectloop"  # the s3 fixture's bucket


def fresh(prefix="reg") -> str:
    return f"s3://{S3_BUCKET}/{prefix}-{uuid.uuid4().hex[:8]}"


def test_version_round_trip_bit_exact(s3, model, tiny_features):
    _, test = tiny_features(2)
    uri = fresh()
    reg = Registry(uri)
    v = reg.register(model, metrics={"note": "s3"})
    assert reg.ids() == [v] and reg.current() == v and Registry.is_registry(uri)
    loaded = Registry(uri).load()
    want, _ = model.score_features(test.features[:6])
    got, _ = loaded.score_features(test.features[:6])
    assert torch.equal(want, got)
    assert reg.info()["metrics"] == {"note": "s3"}

    # a bank update travels the same way, and a handle on the S3 registry follows it
    handle = ModelHandle(uri)
    assert handle.served.label == v
    bank = loaded.abnormal_bank
    bank.add(Provenance("s3-ann", "img", "disc", "scratch"), test.features[0].flatten(1).T[:4])
    loaded.normal_evidence.add(Provenance("normal:img2", "img2", "disc", "good"), test.features[1].flatten(1).T[:3])
    assert reg.publish_bank(loaded) == f"{v}-b0001"
    assert handle.refresh() and len(handle.served.model.abnormal_bank) == len(bank)
    assert len(handle.served.model.normal_evidence) == 3


def test_wrong_credentials_give_a_clear_error(s3):
    cfg = S3Config(endpoint_url=s3.endpoint, access_key="nobody", secret_key="wrong", retries=1)
    with pytest.raises(StoreError, match="credentials"):
        Registry(f"s3://{S3_BUCKET}/x", cfg).ids()
    with pytest.raises(StoreError, match="does not exist"):
        Registry("s3://no-such-bucket-here/x").ids()


def test_server_down_during_save_then_retry(tmp_path, model, monkeypatch, s3_server):
    """The server dies mid-upload: the error is reported, the registry is unchanged, a retry after restart works."""
    server = s3_server(tmp_path / "own-s3").start()
    cfg = S3Config(endpoint_url=server.endpoint, access_key=server.env()["AWS_ACCESS_KEY_ID"],
                   secret_key=server.env()["AWS_SECRET_ACCESS_KEY"], retries=2, connect_timeout_s=1)
    try:
        reg = Registry(f"s3://{S3_BUCKET}/outage", cfg)
        v1 = reg.register(model)
        real_upload = store_mod.S3Store.upload_file
        uploads = []

        def upload_then_die(self, path, key):
            real_upload(self, path, key)
            uploads.append(key)
            if len(uploads) == 2:
                server.kill()

        with monkeypatch.context() as patched, pytest.raises(StoreError, match="unreachable"):
            patched.setattr(store_mod.S3Store, "upload_file", upload_then_die)
            reg.register(model)
        server.start()
        reg = Registry(f"s3://{S3_BUCKET}/outage", cfg)
        assert reg.ids() == [v1] and reg.current() == v1  # the half-written version is invisible
        v3 = reg.register(model)
        assert reg.ids() == [v1, v3] and reg.current() == v3
        assert reg.load().kind == model.kind
        assert reg.gc(keep=5, stale_s=0) == ["v0002"]  # the failed save's leftovers
        assert not [k for k in reg.store.keys("versions") if k.startswith("versions/v0002/")]
    finally:
        server.stop()


def test_concurrent_writers(s3, model):
    uri = fresh("race")
    results, errors = [], []

    def write():
        try:
            results.append(Registry(uri).register(model))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    with ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            pool.submit(write)
    assert not errors and sorted(results) == ["v0001", "v0002", "v0003"]
    reg = Registry(uri)
    assert reg.ids() == sorted(results) and reg.current() in results
    for v in results:
        assert reg.load(v).kind == model.kind


def test_cli_on_s3(s3, tiny_data, tmp_path, capsys):
    uri = fresh("cli")
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"image_size": 128, "coreset_ratio": 0.1}')
    assert main(["train", "--data", str(tiny_data), "--model", "patchcore", "--config", str(cfg), "--registry", uri]) == 0
    assert main(["train", "--data", str(tiny_data), "--model", "patchcore", "--config", str(cfg),
                 "--out", f"{uri}-single"]) == 0
    assert main(["evaluate", "--model", uri, "--data", str(tiny_data)]) == 0
    assert main(["evaluate", "--model", f"{uri}-single", "--data", str(tiny_data)]) == 0
    reg = Registry(uri)
    assert reg.info()["metrics"]["mean"]["image_auroc"] > 0.5 and "fit" in reg.info()
    v2 = reg.register(reg.load())
    capsys.readouterr()
    assert main(["models", "list", "--registry", uri]) == 0
    assert v2 in capsys.readouterr().out
    assert main(["models", "rollback", "--registry", uri]) == 0 and reg.current() == "v0001"
    assert main(["models", "promote", v2, "--registry", uri]) == 0 and reg.current() == v2
    assert main(["models", "gc", "--keep", "1", "--registry", uri]) == 0
    assert reg.ids() == ["v0001", v2]  # v0001 stays: it is the rollback target
    assert main(["models", "show", "v9", "--registry", uri]) == 2


def test_pool_listing_and_arrow_filesystem(s3, tiny_data):
    pool = open_store(f"s3://{S3_BUCKET}/pool")
    files = sorted(tiny_data.glob("disc/test/*/*.png"))[:3]
    for p in files:
        pool.upload_file(p, f"disc/{p.parent.name}_{p.name}")
    pool.write("notes.txt", b"not an image")
    listed = pool_images(f"s3://{S3_BUCKET}/pool")
    assert len(listed) == 3 and all(p.uri.startswith(f"s3://{S3_BUCKET}/pool/disc/") for p in listed)
    assert {p.category for p in listed} == {"disc"}
    assert {read_uri(p.uri) for p in listed} == {f.read_bytes() for f in files}

    path, fs = arrow_filesystem(f"s3://{S3_BUCKET}/ray-runs")
    with fs.open_output_stream(f"{path}/probe/checkpoint.txt") as f:
        f.write(b"from pyarrow")
    assert open_store(f"s3://{S3_BUCKET}/ray-runs").read("probe/checkpoint.txt") == b"from pyarrow"


def test_cached_copy_follows_rewrites(s3, model):
    """A version rewritten under the same URI (a recreated bucket or prefix) is downloaded again,
    never served from the stale local copy."""
    uri = fresh("rewritten")
    reg = Registry(uri)
    v = reg.register(model)
    changed = reg.load()  # now in the local cache
    changed.calibration = changed.calibration.shifted(1.0)
    reg.store.delete("")
    assert reg.ids() == [] and reg.register(changed) == v  # same URI, same version id, other bytes
    assert Registry(uri).load().calibration == changed.calibration != model.calibration


def test_confirmed_normals_from_an_s3_pool(s3, tiny_data, tmp_path):
    """The retraining reads images confirmed normal from an S3 pool: downloaded once, then cached."""
    from defectloop.workers.retrain import confirmed_images

    pool = open_store(fresh("normal-pool"))
    good = sorted(tiny_data.glob("disc/test/good/*.png"))[0]
    pool.upload_file(good, "disc/good.png")
    reg = Registry(fresh())
    reg.publish_labels({"normal": [{"source": f"{pool.uri}/disc/good.png", "category": "disc"},
                                    {"source": f"{pool.uri}/disc/gone.png", "category": "disc"}]})
    (sample,), _ = confirmed_images(reg, "normal", tmp_path / "pool-cache")  # the missing one is skipped
    assert sample.category == "disc" and sample.label == 0 and sample.path.read_bytes() == good.read_bytes()
    pool.delete("disc/good.png")
    (again,), _ = confirmed_images(reg, "normal", tmp_path / "pool-cache")  # from the cache, not S3
    assert again.path == sample.path


@pytest.mark.parametrize("where", ["local", "s3"])
def test_feature_cache_by_content(s3, tmp_path, where):
    """Features kept by image content and backbone, in float16, with the image's size; another
    backbone or input size is another cache."""
    from defectloop.features.cache import FeatureCache, content_hash

    store = open_store(fresh("features") if where == "s3" else tmp_path / "features")
    cache = FeatureCache(store, "tf_efficientnet_lite0", None, 128)
    digest = content_hash(b"an image's bytes")
    assert digest not in cache and len(cache) == 0
    f = torch.randn(152, 16, 16)
    cache.put(digest, f, (640, 480))
    got = cache.get(digest)
    assert digest in cache and len(cache) == 1 and got.size == (640, 480) and torch.equal(got.features, f.half())
    assert digest not in FeatureCache(store, "tf_efficientnet_lite0", None, 256)
    with pytest.raises(FileNotFoundError):
        cache.get(content_hash(b"another image"))
    assert cache.find(content_hash(b"another image")) is None and cache.find(digest).size == (640, 480)
