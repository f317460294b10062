"""Tiles: an image inspected near its own resolution as overlapping tiles of the model's input size."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from defectloop.data import Sample, load_image, load_mask, load_split
from defectloop.data.tiles import Tile, firsts, per_side, runs, side, stitch, tiles, tiles_for
from defectloop.features import extract, image_tensor, tile_tensors
from defectloop.metrics import auroc
from defectloop.models import Fitter, ModelConfig, choose_tiles, create_model, tiled
from defectloop.models.holdout import split_holdout


def test_the_tiling_nearest_an_image_s_own_resolution():
    assert [side(n, 256, 128) for n in (1, 2, 3)] == [256, 384, 512]
    assert tiles_for(512, 512, 256, 128, most=8) == 3  # the dev screw: its own 512 px
    assert tiles_for(300, 300, 256, 128, most=8) == 1  # about a tile: seen whole
    assert tiles_for(4000, 3000, 256, 128, most=8) == 8  # a 12 MP camera: as far as allowed
    assert tiles_for(640, 640, 256, 128, most=8) == 4
    assert per_side(9) == 3 and per_side(1) == 1
    with pytest.raises(ValueError, match="do not make a square"):
        per_side(8)


def test_stitched_crops_give_back_the_image_at_the_tiles_scale():
    """Each pixel of the stitched map comes from one tile, where that tile saw it: crops of an image
    stitched back are the image resized to the tiles' side, exactly."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    grid = tiles(3, 32, 16)
    crops = torch.stack([torch.from_numpy(t.crop(image)[..., 0].astype(np.float32)) for t in grid])
    assert crops.shape == (9, 32, 32)
    resized = Tile(1, 0, 0, side(3, 32, 16), 0).crop(image)[..., 0]  # one tile of the whole side
    assert torch.equal(stitch(crops, 3, 16), torch.from_numpy(resized.astype(np.float32)))
    # the seam lies mid-overlap: the top-left quarter of the overlap comes from the first tile
    marked = torch.stack([torch.full((32, 32), float(i)) for i in range(9)])
    out = stitch(marked, 3, 16)
    assert out[0, 23] == 0 and out[0, 24] == 1 and out[23, 0] == 0 and out[24, 0] == 3 and out[-1, -1] == 8


def test_an_image_s_tiles_are_one_run_and_stay_on_one_side_of_the_hold_out(tiny_data):
    split = load_split(tiny_data)
    samples = tiled(split.train, ModelConfig(image_size=64, tile_overlap=32, tiles={"tile": 3}))
    assert len(samples) == sum(9 if s.category == "tile" else 1 for s in split.train)
    assert runs([s.parent_id for s in samples]) == [9 if s.category == "tile" else 1 for s in split.train]
    assert [samples[i].parent_id for i in firsts([s.parent_id for s in samples])] == [s.parent_id for s in split.train]
    assert len({s.image_id for s in samples}) == len(samples)  # a tile has an id of its own
    fit, held = split_holdout(samples, 0.2, 0)
    side_of = {}
    for i in fit + held:
        side_of.setdefault(samples[i].parent_id, set()).add(i in held)
    assert all(len(v) == 1 for v in side_of.values()) and any(True in v for v in side_of.values())
    # the same images, untiled, are held back alike
    _, held_whole = split_holdout(split.train, 0.2, 0)
    assert {samples[i].parent_id for i in held} == {split.train[i].parent_id for i in held_whole}


def test_a_category_about_a_tile_s_size_is_seen_whole_and_the_choice_is_recorded(tiny_data, monkeypatch):
    split = load_split(tiny_data)
    monkeypatch.setattr("defectloop.models.tile_choice.load_backbone",
                        lambda *a: pytest.fail("nothing to validate: no backbone needed"))
    config = choose_tiles(ModelConfig(image_size=128, tiles={"mesh": 2}), split.train)
    assert config.tiles == {"disc": 1, "mesh": 2, "tile": 1}  # a category already named keeps its choice
    assert ModelConfig.from_dict(config.to_dict()).tiles == config.tiles  # saved in the version's config


@pytest.fixture(scope="module")
def tiled_model(tiny_data):
    """PatchCore on the generated 128 px images seen as 3 x 3 tiles of 64 px (side 128)."""
    model = create_model(ModelConfig(kind="patchcore", image_size=64, tile_overlap=32, coreset_ratio=0.1,
                                     tiles={c: 3 for c in ("tile", "disc", "mesh")}))
    Fitter(model).fit_samples(load_split(tiny_data).train)
    return model


def test_a_tiled_model_finds_the_defects_and_every_path_scores_an_image_alike(tiled_model, tiny_data):
    """Tiles stitched back: one map at the tiles' side per image, the defects ranked above the normals,
    and the same score whether the image comes as test features (evaluate), as tile inputs (the
    Serve scorer's path) or from the pool's patch scores (Label Studio's predictions)."""
    from defectloop.labeling.label_config import LabelConfig, build_label_config
    from defectloop.labeling.predict import PoolPredictor

    model = tiled_model
    test = load_split(tiny_data).test
    feats = extract(model.embedder, tiled(test, model.config), 64)
    scores, maps = model.score_images(feats.features, [s.parent_id for s in feats.samples])
    assert len(scores) == len(test) and all(m.shape == (128, 128) for m in maps)
    assert auroc(scores.numpy(), np.array([s.label for s in test])) > 0.9
    # only the patches the stitched maps read were searched, and the maps are those of all patches
    keep = model.post.needed([9] * len(test), 8, 8)
    assert keep.shape == (9 * len(test), 8, 8) and 0.3 < keep.float().mean() < 1
    every_score, every_map = model.post.stitched(*model.score_features(feats.features), [9] * len(test))
    assert torch.equal(scores, every_score) and all(torch.equal(a, b) for a, b in zip(maps, every_map, strict=True))

    images = [load_image(s.path) for s in test[:6]]
    inputs = [tile_tensors(img, model.config.tiling(s.category), 64) for img, s in zip(images, test[:6], strict=True)]
    assert all(x.shape == (9, 3, 64, 64) for x in inputs)
    served = model.predict(torch.cat(inputs), [s.category for s in test[:6]], [9] * 6)
    assert torch.allclose(torch.tensor([p.score for p in served]), scores[:6], atol=1e-4)
    assert served[0].mask(300, 200).shape == (200, 300)  # a mask at any original size

    tasks = [{"id": i + 1, "data": {"image": str(s.path), "category": s.category}} for i, s in enumerate(test[:6])]
    pool = PoolPredictor(model, tasks, lambda t: Path(t["data"]["image"]).read_bytes(),
                         LabelConfig.parse(build_label_config(["scratch"])), batch_size=10)
    assert pool.tiles == [9] * 6 and pool.features.shape[0] == 54
    assert torch.allclose(pool.raw_scores(model, [1, 2, 3, 4, 5, 6]), scores[:6], atol=1e-4)
    assert pool.embeddings().shape == (6, model.dim)


def test_saved_pool_features_of_another_tiling_are_embedded_again(tiled_model, tiny_data, tmp_path):
    import copy

    from defectloop.labeling.label_config import LabelConfig, build_label_config
    from defectloop.labeling.predict import PoolPredictor

    test = load_split(tiny_data).test[:4]
    tasks = [{"id": i + 1, "data": {"image": str(s.path), "category": s.category}} for i, s in enumerate(test)]
    config = LabelConfig.parse(build_label_config(["scratch"]))
    saved = tmp_path / "pool_features.safetensors"

    def fetch(t: dict) -> bytes:
        return Path(t["data"]["image"]).read_bytes()

    assert PoolPredictor(tiled_model, tasks, fetch, config, cache=saved).tiles == [9] * 4
    whole = copy.copy(tiled_model)
    whole.config = replace(tiled_model.config, tiles={})  # a version that sees these images whole
    again = PoolPredictor(whole, tasks, fetch, config, cache=saved)
    assert again.tiles == [1] * 4 and again.features.shape[0] == 4


def test_a_confirmed_mask_on_a_tiled_image_adds_the_patches_under_it(tiny_data, small_config):
    """Each tile's patches under the mask join the abnormal bank: more than the whole image at the
    model's size would give (the defect seen at the tiles' resolution)."""
    from defectloop.memory import Provenance

    split = load_split(tiny_data)
    defect = next(s for s in split.test if s.label == 1 and s.mask_path is not None)
    image, mask = load_image(defect.path), load_mask(defect.mask_path)
    whole = create_model(replace(small_config("dmad"), image_size=64))
    tiled_dmad = create_model(replace(small_config("dmad"), image_size=64, tile_overlap=32, tiles={defect.category: 3}))
    prov = Provenance("a1", defect.image_id, defect.category, defect.defect)
    assert tiled_dmad.confirm(prov, image, mask) > whole.confirm(prov, image, mask) > 0


def test_image_tensor_of_one_tile_is_the_whole_image():
    image = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    assert torch.equal(tile_tensors(image, tiles(1, 32, 16), 32)[0], image_tensor(image, 32))
    assert Sample(Path("c/train/good/x.png"), "c").tiled(tiles(1, 32, 16))[0].tile is None
