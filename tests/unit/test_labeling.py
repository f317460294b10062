"""Label Studio glue without a server: brush RLE codec (bit-exact with the SDK), label config, event inbox."""

from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter import brush as sdk

from defectloop.labeling.brush import BrushRLE
from defectloop.labeling.inbox import EventInbox
from defectloop.labeling.label_config import LabelConfig, build_label_config

CODEC = BrushRLE()


def masks():
    rng = np.random.default_rng(0)
    yield np.zeros((7, 9), bool)
    yield np.ones((5, 3), bool)
    yield rng.random((33, 47)) > 0.5  # many single-value runs: literal records
    blob = np.zeros((300, 260), bool)
    blob[40:200, 10:250] = True  # runs over 256 values: 16-bit lengths
    yield blob
    yield np.ones((200, 400), bool)  # one run of 320000 values: split into 2**16 blocks
    yield np.ones((1, 1), bool)


@pytest.mark.parametrize("mask", list(masks()), ids=lambda m: f"{m.shape}-{int(m.sum())}")
def test_brush_rle_bit_exact_with_sdk(mask):
    ours = CODEC.encode(mask)
    assert ours == sdk.mask2rle(mask.astype(np.uint8) * 255)
    h, w = mask.shape
    assert (CODEC.decode(ours, h, w) == mask).all()
    assert (sdk.decode_rle(ours).reshape(h, w, 4)[:, :, 3] > 0).tolist() == mask.tolist()


def test_brush_rle_decodes_sdk_output_of_other_values():
    arr = np.array([0, 0, 7, 7, 7, 1, 2, 3] * 40 + [9] * 70000, dtype=np.uint8)
    rle = sdk.encode_rle(arr)
    assert rle == CODEC.encode_values(arr)
    assert (CODEC.decode_values(rle) == arr).all()


def test_brush_rle_rejects_bad_input():
    rle = CODEC.encode(np.ones((10, 10), bool))
    with pytest.raises(ValueError, match="expected 12x10x4"):
        CODEC.decode(rle, 12, 10)
    with pytest.raises(ValueError, match="ends early"):
        CODEC.decode(rle[:3], 10, 10)
    with pytest.raises(ValueError, match="2-D"):
        CODEC.encode(np.ones((2, 2, 2), bool))


def test_label_config_round_trip_and_errors():
    cfg = LabelConfig.parse(build_label_config(["scratch", "crack & dent"]))
    assert (cfg.image, cfg.image_key, cfg.brush, cfg.choices) == ("image", "image", "defect", "verdict")
    assert cfg.defects == ("scratch", "crack & dent", "defect")  # the generic label for types the banks don't know
    assert cfg.choice_values == ("normal", "anomalous")
    assert cfg.defect_label("crack & dent") == "crack & dent" and cfg.defect_label("other") == "defect"
    assert cfg.defect_label(None) == "defect"
    own = LabelConfig.parse('<View><Image name="img" value="$photo"/>'
                            '<BrushLabels name="tag" toName="img"><Label value="Defect"/></BrushLabels></View>')
    assert (own.image, own.image_key, own.brush, own.choices) == ("img", "photo", "tag", None)
    assert own.defect_label("scratch") == "Defect"  # no generic label in someone else's config: the first
    with pytest.raises(ValueError, match="no <Image>"):
        LabelConfig.parse("<View><Text name='t' value='$text'/></View>")
    with pytest.raises(ValueError, match="BrushLabels"):
        LabelConfig.parse('<View><Image name="i" value="$image"/></View>')
    with pytest.raises(ValueError, match="not valid XML"):
        LabelConfig.parse("<View><Image")


def test_inbox_is_durable_and_ordered(tmp_path):
    inbox = EventInbox(tmp_path)
    a = inbox.put({"action": "ANNOTATION_CREATED", "annotation": {"id": 1}})
    b = inbox.put({"action": "START_TRAINING"})
    again = EventInbox(tmp_path)  # a restarted service sees what was queued
    assert [i for i, _ in again.pending()] == [a, b]
    again.done(a)
    assert [e["action"] for _, e in inbox.pending()] == ["START_TRAINING"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_import_is_an_event_for_the_pool():
    from defectloop.labeling.events import InvalidEvent, parse_event

    body = {"action": "TASKS_CREATED", "project": {"id": 4}, "tasks": [{"id": 12, "data": {}}, {"id": 9}]}
    event = parse_event(body)
    assert (event.kind, event.project, event.tasks) == ("tasks", 4, [12, 9])
    assert parse_event({**body, "tasks": body["tasks"][::-1]}).identity() == event.identity()  # a redelivery
    for tasks in ([], [{"id": "12"}], [{"id": True}], None):
        with pytest.raises(InvalidEvent, match="integer `id`"):
            parse_event({**body, "tasks": tasks})


def test_the_neutral_pool_holds_files_not_links_out_of_it(tmp_path):
    """The demo's data folder is of symlinks to the real images (``--data`` anywhere): the pool Label
    Studio serves must hold the images themselves under neutral names, never a link that resolves
    outside its document root (Label Studio refuses those)."""
    from defectloop.labeling.project import PoolImage
    from defectloop.stack import neutral_pool

    outside = tmp_path / "data" / "screw" / "test" / "scratch_head"
    outside.mkdir(parents=True)
    (outside / "003.png").write_bytes(b"png bytes")
    link = tmp_path / "root" / "stack-data" / "screw" / "test" / "scratch_head" / "test-003.png"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside / "003.png")
    (out,) = neutral_pool([PoolImage(str(link), "screw", "screw/test/scratch_head/test-003.png")], tmp_path / "root" / "pool")
    path = Path(out.uri)
    assert path.resolve().is_relative_to(tmp_path / "root" / "pool") and not path.is_symlink()
    assert path.read_bytes() == b"png bytes" and "scratch" not in path.name and out.category == "screw"


def test_saved_pool_features_follow_the_pool(served_registry, tiny_data, tmp_path, monkeypatch):
    """The pool's saved features grow with its imports: a restart embeds nothing it had, and only
    the tasks imported since, while tasks deleted meanwhile are left out."""
    import torch

    from defectloop.labeling.predict import PoolPredictor
    from defectloop.registry import Registry

    model = Registry(served_registry).load()
    images = sorted(tiny_data.glob("*/test/*/*.png"))[:13]
    tasks = [{"id": i + 1, "data": {"image": str(p), "category": p.parts[-4]}} for i, p in enumerate(images)]
    config = LabelConfig.parse(build_label_config(["scratch"]))
    saved = tmp_path / "state" / "pool_features.safetensors"

    def fetch(t: dict) -> bytes:
        return Path(t["data"]["image"]).read_bytes()

    pool = PoolPredictor(model, tasks[:8], fetch, config, batch_size=5, cache=saved)
    assert pool.add(model, tasks[:12]) == [9, 10, 11, 12]
    embedded: list[int] = []
    forward = model.embedder.forward
    monkeypatch.setattr(model.embedder, "forward", lambda x: embedded.append(len(x)) or forward(x))
    again = PoolPredictor(model, tasks[:12], fetch, config, cache=saved)
    assert embedded == [] and again.task_ids == pool.task_ids and again.sizes == pool.sizes
    assert torch.equal(again.features, pool.features) and again.categories == pool.categories
    later = PoolPredictor(model, tasks[2:13], fetch, config, cache=saved)  # 1 and 2 deleted, 13 imported
    assert embedded == [1] and later.task_ids == list(range(3, 14))
    assert torch.equal(later.features[:10], pool.features[2:12])
    assert PoolPredictor(model, tasks[2:13], fetch, config, cache=saved).task_ids == later.task_ids and embedded == [1]
    assert not list(saved.parent.glob(".*.tmp"))


def test_a_new_mask_edge_redraws_only_the_masks_shown(served_registry, tiny_data, tmp_path):
    """When a category's mask edge moves, the pool's outcomes are redone for its images that show a
    mask (called anomalous), with masks cut at the new edge; the rest keep theirs."""
    from dataclasses import replace

    from defectloop.labeling.predict import PoolPredictor
    from defectloop.models import Calibration
    from defectloop.registry import Registry

    model = Registry(served_registry).load()
    images = sorted(tiny_data.glob("*/test/*/*.png"))
    tasks = [{"id": i + 1, "data": {"image": str(p), "category": p.parts[-4]}} for i, p in enumerate(images)]
    pool = PoolPredictor(model, tasks, lambda t: Path(t["data"]["image"]).read_bytes(),
                         LabelConfig.parse(build_label_config(["scratch"])))
    pool.refresh(model)
    cat = pool.categories[0]
    shown = [i for i, (c, o) in enumerate(zip(pool.categories, pool._outcomes, strict=True)) if c == cat and o.anomalous]
    before = list(pool._outcomes)
    assert shown and len(shown) < pool.categories.count(cat)
    model.calibration = Calibration({**model.calibration.entries, cat: replace(model.calibration.get(cat), mask_level=0.9)})
    assert pool.refresh(model) == len(shown)
    assert all(pool._outcomes[i].rle != before[i].rle for i in shown)  # a tighter edge: smaller masks
    assert [o for i, o in enumerate(pool._outcomes) if i not in shown] == [o for i, o in enumerate(before) if i not in shown]


def test_pool_features_come_from_the_feature_cache(served_registry, tiny_data, tmp_path, monkeypatch):
    """A pool embedded once fills the feature cache by image content; a second pool over the same
    images (another project, a restart without its own saved features) embeds nothing and
    predicts the same, up to float16."""
    import torch

    from defectloop.features.cache import FeatureCache
    from defectloop.labeling.predict import PoolPredictor
    from defectloop.registry import Registry

    model = Registry(served_registry).load()
    images = sorted(tiny_data.glob("*/test/*/*.png"))[:12]
    tasks = [{"id": i + 1, "data": {"image": str(p), "category": p.parts[-4]}} for i, p in enumerate(images)]
    tasks.append({"id": 99, "data": {"image": str(tmp_path / "gone.png"), "category": "disc"}})  # unreadable
    config = LabelConfig.parse(build_label_config(["scratch"]))
    c = model.config
    cache = FeatureCache.open(str(tmp_path / "features"), c.backbone, c.backbone_checkpoint, c.image_size)

    def fetch(t: dict) -> bytes:
        return Path(t["data"]["image"]).read_bytes()

    first = PoolPredictor(model, tasks, fetch, config, batch_size=5, features=cache)
    assert len(cache) == len(images) and first.task_ids == [t["id"] for t in tasks[:-1]]
    monkeypatch.setattr(model.embedder, "forward", lambda x: pytest.fail("embedded a cached image"))
    second = PoolPredictor(model, tasks, fetch, config, features=cache)
    assert second.task_ids == first.task_ids and second.sizes == first.sizes and second.categories == first.categories
    assert torch.allclose(second.features, first.features, atol=1e-2 * float(first.features.abs().max()))
    ids = first.task_ids
    assert torch.allclose(second.raw_scores(model, ids), first.raw_scores(model, ids), atol=1e-2)
