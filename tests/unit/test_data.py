import numpy as np
import pytest
from PIL import Image

from defectloop.data import load_split, read_category
from defectloop.data.synthetic import add_defect, add_glare, make_dataset, make_part


def test_reader_and_categories_as_metadata(tiny_data):
    train, test = read_category(tiny_data, "disc")
    assert len(train) == 16 and all(s.label == 0 and s.category == "disc" for s in train)
    bad = [s for s in test if s.label == 1]
    assert len(bad) == 6 and all(s.mask_path is not None and s.mask_path.is_file() for s in bad)


def test_semi_supervised_split_moves_seen_anomalies(tiny_data):
    base = load_split(tiny_data)
    split = load_split(tiny_data, anomalies_per_class=2, seed=5)
    seen = [s for s in split.train if s.label == 1]
    assert len(seen) == 6 and {s.category for s in seen} == {"tile", "disc", "mesh"}
    assert not {s.path for s in seen} & {s.path for s in split.test}
    assert len(split.test) == len(base.test) - 6
    again = load_split(tiny_data, anomalies_per_class=2, seed=5)
    assert [s.path for s in again.train] == [s.path for s in split.train]
    one = load_split(tiny_data, anomalies_per_class=1, seed=5)
    assert {s.path for s in one.train if s.label} <= {s.path for s in seen}


def test_category_without_masks_keeps_its_test_set(tiny_data, tmp_path):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(tiny_data / "tile", root / "tile")
    shutil.rmtree(root / "tile" / "ground_truth")
    split = load_split(root, anomalies_per_class=3)
    assert not any(s.label for s in split.train)
    assert len(split.test) == 11 and "no pixel masks" in split.notes[0]


def test_bad_category_and_empty_category(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_split(tiny_data, ["nope"])
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="no training images"):
        load_split(tmp_path)


def test_synthetic_defect_mask_is_exact():
    rng = np.random.default_rng(0)
    for kind in ("scratch", "blob", "crack"):
        part = make_part("tile", 96, rng)
        img, mask = add_defect(part, kind, rng)
        changed = (img != part).any(2)
        assert mask.any() and not changed[~mask].any()
        assert changed[mask].mean() > 0.9


def test_generated_dataset_layout(tiny_data):
    m = next((tiny_data / "mesh" / "ground_truth").rglob("*_mask.png"))
    assert np.asarray(Image.open(m)).max() == 255


def test_generated_data_can_be_hard(tmp_path):
    """The demo's data: faint defects (low opacity) and test images under a lighting the training
    images never show (glare), normal and defective alike; the training images stay plain."""
    rng = np.random.default_rng(0)
    part = make_part("disc", 96, rng)
    faint, mask = add_defect(part, "blob", np.random.default_rng(1), strength=0.1)
    plain, same = add_defect(part, "blob", np.random.default_rng(1), strength=0.85)
    assert np.array_equal(mask, same)
    change = lambda img: np.abs(img.astype(int) - part.astype(int))[mask].mean()  # noqa: E731
    assert 0 < change(faint) < 0.25 * change(plain)
    glared = add_glare(part, rng)
    assert glared.astype(int).sum() > part.astype(int).sum() and (glared >= part).all()

    def brightness(root, split):
        return [np.asarray(Image.open(p)).mean() for p in sorted((root / "disc" / split).rglob("*.png"))]

    plain_root = make_dataset(tmp_path / "plain", ("disc",), n_train=6, n_test_good=12, n_test_bad=0, size=64)
    drift_root = make_dataset(tmp_path / "drift", ("disc",), n_train=6, n_test_good=12, n_test_bad=0, size=64, drift=0.5)
    assert brightness(plain_root, "train") == brightness(drift_root, "train")  # same draws: no glare in training
    assert np.mean(brightness(drift_root, "test")) > np.mean(brightness(plain_root, "test")) + 5
