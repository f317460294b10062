"""Tiles: an image inspected near its own resolution as overlapping tiles of the model's input size."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from defectloop.data import Sample, load_image, load_mask, load_split
from defectloop.data.tiles import (
    WHOLE,
    Grid,
    defective_fraction,
    firsts,
    image_grids,
    resized,
    side,
    stitch,
    tiles,
    tiles_for,
)
from defectloop.features import extract, image_tensor, tile_mask_tensors, tile_tensors
from defectloop.metrics import auroc
from defectloop.models import Fitter, ModelConfig, choose_tiles, create_model, tiled
from defectloop.models.holdout import split_holdout
from defectloop.scoring import ModelHandle


def test_the_grid_nearest_an_image_s_own_resolution_and_aspect():
    assert [side(n, 256, 128) for n in (1, 2, 3)] == [256, 384, 512]
    assert tiles_for(512, 512, 256, 128, most=8) == Grid(3, 3)  # the dev screw: its own 512 px
    assert tiles_for(300, 300, 256, 128, most=8) == WHOLE  # about a tile: seen whole
    assert tiles_for(640, 640, 256, 128, most=8) == Grid(4, 4)
    # a 12 MP 4:3 camera: its long side as far as allowed (1152 px), the short one in proportion
    assert tiles_for(4000, 3000, 256, 128, most=8) == Grid(6, 8)  # 896 x 1152 px, not stretched to a square
    assert tiles_for(3000, 4000, 256, 128, most=8) == Grid(8, 6)
    assert tiles_for(1000, 200, 256, 128, most=8) == Grid(1, 7)  # a strip: one row, resized up only to a tile
    assert Grid(6, 8).shape(256, 128) == (896, 1152) and Grid(6, 8).count == 48
    # versions saved before oblong grids said n for n x n
    assert Grid.of(3) == Grid(3, 3) and Grid.of([2, 5]) == Grid(2, 5) and Grid(3, 3).key == "3" and Grid(2, 5).key == "2x5"
    with pytest.raises(ValueError, match="at least one row"):
        Grid.of([0, 2])


@pytest.mark.parametrize("grid", [Grid(3, 3), Grid(2, 3), Grid(3, 1)])
def test_stitched_crops_give_back_the_image_at_the_grid_s_shape(grid):
    """Each pixel of the stitched map comes from one tile, where that tile saw it: crops of an image
    stitched back are the image resized to its grid's shape, exactly, oblong grids included."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    cut = tiles(grid, 32, 16)
    crops = torch.stack([torch.from_numpy(t.crop(image)[..., 0].astype(np.float32)) for t in cut])
    assert crops.shape == (grid.count, 32, 32)
    whole = resized(image, *grid.shape(32, 16))[..., 0]
    assert whole.shape == (side(grid.rows, 32, 16), side(grid.cols, 32, 16))
    assert torch.equal(stitch(crops, grid, 16), torch.from_numpy(whole.astype(np.float32)))
    # an image's tiles, and its mask's, are cut from one resize: each is its own crop
    assert torch.equal(tile_tensors(image, cut, 32), torch.stack([image_tensor(t.crop(image), 32) for t in cut]))
    mask = rng.random((90, 120)) > 0.7
    assert torch.equal(tile_mask_tensors(mask, cut, 32), torch.stack([torch.from_numpy(t.cut(defective_fraction(mask, *t.shape))) for t in cut]))


def test_the_seam_lies_mid_overlap():
    """The top-left quarter of an overlap comes from the first tile, row by row."""
    marked = torch.stack([torch.full((32, 32), float(i)) for i in range(6)])
    out = stitch(marked, Grid(2, 3), 16)
    assert out.shape == (48, 64)
    assert out[0, 23] == 0 and out[0, 24] == 1 and out[23, 0] == 0 and out[24, 0] == 3 and out[-1, -1] == 5


def test_an_image_s_tiles_are_one_run_and_stay_on_one_side_of_the_hold_out(tiny_data):
    split = load_split(tiny_data)
    samples = tiled(split.train, ModelConfig(image_size=64, tile_overlap=32, tiles={"tile": [2, 3]}))
    assert len(samples) == sum(6 if s.category == "tile" else 1 for s in split.train)
    assert image_grids(samples) == [Grid(2, 3) if s.category == "tile" else WHOLE for s in split.train]
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
    assert config.tiles == {"disc": WHOLE, "mesh": Grid(2, 2), "tile": WHOLE}  # a category already named keeps its choice
    assert ModelConfig.from_dict(config.to_dict()).tiles == config.tiles  # saved in the version's config


@pytest.fixture(scope="module", params=[Grid(3, 3), Grid(2, 3)], ids=["3x3", "2x3"])
def tiled_model(tiny_data, request):
    """PatchCore on the generated 128 px images seen as tiles of 64 px: 3 x 3 (128 x 128 px), or an
    oblong 2 x 3 (96 x 128 px)."""
    model = create_model(ModelConfig(kind="patchcore", image_size=64, tile_overlap=32, coreset_ratio=0.1,
                                     tiles={c: request.param for c in ("tile", "disc", "mesh")}))
    Fitter(model).fit_samples(load_split(tiny_data).train)
    return model


def test_a_tiled_model_finds_the_defects_and_every_path_scores_an_image_alike(tiled_model, tiny_data, tmp_path):
    """Tiles stitched back: one map at the tiles' side per image, the defects ranked above the normals,
    and the same score whether the image comes as test features (evaluate), as tile inputs (the
    Serve scorer's path) or from the pool's patch scores (Label Studio's predictions)."""
    from defectloop.labeling.label_config import LabelConfig, build_label_config
    from defectloop.labeling.predict import PoolPredictor

    model = tiled_model
    grid = model.config.grid("tile")
    test = load_split(tiny_data).test
    feats = extract(model.embedder, tiled(test, model.config), 64)
    scores, maps = model.score_images(feats.features, image_grids(feats.samples))
    assert len(scores) == len(test) and all(m.shape == grid.shape(64, 32) for m in maps)
    assert auroc(scores.numpy(), np.array([s.label for s in test])) > 0.9
    # only the patches the stitched maps read were searched, and the maps are those of all patches
    keep = model.post.needed([grid] * len(test), 8, 8)
    assert keep.shape == (grid.count * len(test), 8, 8) and 0.3 < keep.float().mean() < 1
    every_score, every_map = model.post.stitched(*model.score_features(feats.features), [grid] * len(test))
    assert torch.equal(scores, every_score) and all(torch.equal(a, b) for a, b in zip(maps, every_map, strict=True))

    images = [load_image(s.path) for s in test[:6]]
    inputs = [tile_tensors(img, model.config.tiling(s.category), 64) for img, s in zip(images, test[:6], strict=True)]
    assert all(x.shape == (grid.count, 3, 64, 64) for x in inputs)
    served = model.predict(torch.cat(inputs), [s.category for s in test[:6]], [grid] * 6)
    assert torch.allclose(torch.tensor([p.score for p in served]), scores[:6], atol=1e-4)
    assert served[0].mask(300, 200).shape == (200, 300)  # a mask at any original size
    # the Serve scorer's handle: each image's grid from its category under the version it serves
    model.save(tmp_path / "version")
    handle = ModelHandle(tmp_path / "version")
    by_handle = handle.score(inputs, [s.category for s in test[:6]])
    assert torch.allclose(torch.tensor([r.prediction.score for r in by_handle]), scores[:6], atol=1e-4)
    with pytest.raises(ValueError, match="tiles given"):  # cut for another grid than the version's
        handle.score([inputs[0][:1]], [test[0].category])
    # tiles cut before a version swap are scored as the grid they were cut into
    one = handle.score([tile_tensors(images[0], tiles(WHOLE, 64, 32), 64)], [test[0].category], [WHOLE])[0]
    assert one.prediction.amap.shape == (64, 64)

    tasks = [{"id": i + 1, "data": {"image": str(s.path), "category": s.category}} for i, s in enumerate(test[:6])]
    pool = PoolPredictor(model, tasks, lambda t: Path(t["data"]["image"]).read_bytes(),
                         LabelConfig.parse(build_label_config(["scratch"])), batch_size=10)
    assert pool.grids == [grid] * 6 and pool.features.shape[0] == 6 * grid.count
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

    grid = tiled_model.config.grid("tile")
    first = PoolPredictor(tiled_model, tasks, fetch, config, cache=saved)
    assert first.grids == [grid] * 4
    if grid.rows == grid.cols:  # a file saved before oblong grids (each task's count of tiles) is read as n x n
        meta = saved.with_suffix(".json")
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "tiles": [grid.count] * 4}))
        read = PoolPredictor(tiled_model, tasks, lambda t: pytest.fail("read, not embedded again"), config, cache=saved)
        assert read.grids == [grid] * 4 and torch.equal(read.features, first.features)
    whole = copy.copy(tiled_model)
    whole.config = replace(tiled_model.config, tiles={})  # a version that sees these images whole
    again = PoolPredictor(whole, tasks, fetch, config, cache=saved)
    assert again.grids == [WHOLE] * 4 and again.features.shape[0] == 4


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
    assert torch.equal(tile_tensors(image, tiles(WHOLE, 32, 16), 32)[0], image_tensor(image, 32))
    assert Sample(Path("c/train/good/x.png"), "c").tiled(tiles(WHOLE, 32, 16))[0].tile is None


def test_extract_decodes_an_image_once_for_all_its_tiles(tiled_model, tiny_data, monkeypatch):
    """Training and evaluation read each image (and its mask) once and cut its tiles from one resize:
    the same inputs as the Serve path's, in the samples' order, a lone tile included."""
    import defectloop.features.embedding as embedding

    model = tiled_model
    test = [s for s in load_split(tiny_data).test if s.category == "tile"]
    test = test[:2] + [s for s in test if s.mask_path is not None][:2]
    samples = tiled(test, model.config)
    samples = samples + samples[4:5]  # one tile of an image on its own
    reads: list[Path] = []
    monkeypatch.setattr(embedding, "load_image", lambda p: reads.append(p) or load_image(p))
    got = extract(model.embedder, samples, 64, batch_size=5)
    assert reads == [s.path for s in test] + [samples[4].path]  # per image, not per tile
    tiling = model.config.tiling("tile")
    inputs = torch.cat([tile_tensors(load_image(s.path), tiling, 64) for s in test] + [image_tensor(samples[4].read(), 64)[None]])
    assert torch.allclose(got.features, model.embedder(inputs).float(), atol=1e-5)
    n = len(tiling)
    for i, s in enumerate(test):
        masks = got.masks[i * n:(i + 1) * n]
        if s.mask_path is None:
            assert all(m is not None and not m.any() for m in masks)  # a normal image: no defect anywhere
        else:
            expect = tile_mask_tensors(load_mask(s.mask_path), tiling, 64)
            assert torch.equal(torch.stack(masks), expect) and expect.any()
