import json
import os
from pathlib import Path

import pytest
from PIL import Image

from defectloop.cli import main


@pytest.fixture()
def cfg_file(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"image_size": 128, "coreset_ratio": 0.1, "steps": 60, "batch_size": 256,
                             "synthetic_per_category": 1, "train_patches": 10000}))
    return p


def test_train_evaluate_score(tiny_data, tmp_path, cfg_file, capsys):
    out = tmp_path / "model"
    assert main(["train", "--data", str(tiny_data), "--categories", "disc,mesh", "--model", "dmad",
                 "--anomalies-per-class", "1", "--config", str(cfg_file), "--out", str(out)]) == 0
    assert (out / "weights.safetensors").is_file() and (out / "fit.json").is_file()
    js = tmp_path / "m.json"
    assert main(["evaluate", "--model", str(out), "--data", str(tiny_data), "--categories", "disc,mesh",
                 "--anomalies-per-class", "1", "--json", str(js), "--plots", str(tmp_path / "plots")]) == 0
    res = json.loads(js.read_text())
    assert set(res["categories"]) == {"disc", "mesh"}
    keys = {"image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "f1_max", "mask_iou", "n_test"}
    assert set(res["mean"]) == keys and all(set(v) == keys | {"serves", "tiles"} for v in res["categories"].values())
    assert all(v["tiles"] == [1, 1] for v in res["categories"].values())  # 128 px images, 128 px model: seen whole
    assert all(0 <= v["mask_iou"] <= 1 for v in res["categories"].values())  # every test defect has a mask
    assert res["categories"]["disc"]["n_test"] == 10
    # one mask per category, none held back: the head serves where it trained on a real mask
    assert {v["serves"] for v in res["categories"].values()} == {"head"}
    assert "trained on 1 real mask" in json.loads((out / "heads.json").read_text())["categories"]["disc"]["why"]
    assert (tmp_path / "plots" / "score_histograms.png").is_file()
    assert (tmp_path / "plots" / "overlay_disc.png").is_file()
    printed = capsys.readouterr().out
    assert "image_auroc" in printed and "mean" in printed

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    good = next((tiny_data / "disc" / "test" / "blob").glob("*.png"))
    twin = tiny_data / "mesh" / "test" / "good" / good.name  # same file name, another category
    assert twin.is_file()
    rc = main(["score", "--model", str(out), "--category", "disc", "--heatmaps", str(tmp_path / "hm"),
               str(good), str(twin), str(bad)])
    captured = capsys.readouterr()
    assert rc == 1  # one file failed, and said so
    line = next(x for x in captured.out.splitlines() if x.startswith(str(good)))
    assert "threshold" in line and "(disc)" in line and ("normal" in line or "anomalous" in line)
    assert "bad.png: empty file" in captured.err
    below = tmp_path / "hm" / tiny_data.relative_to(Path(os.path.commonpath([tiny_data, tmp_path])))  # the inputs' common folder
    heatmaps = {below / "disc" / "test" / "blob" / f"{good.stem}_heatmap.png",
                below / "mesh" / "test" / "good" / f"{good.stem}_heatmap.png"}
    assert set((tmp_path / "hm").rglob("*.png")) == heatmaps  # one each: no overwrite
    assert main(["score", "--model", str(out), "--json", str(good)]) == 0
    (res,) = json.loads(capsys.readouterr().out)
    assert res["image"] == str(good) and res["threshold_of"] == "all categories" and res["heatmap"] is None
    assert res["decision"] == ("anomalous" if res["score"] > res["threshold"] else "normal")


def test_train_reports_skipped_files(tiny_data, tmp_path, cfg_file, capsys):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(tiny_data / "tile", data / "tile")
    (data / "tile" / "train" / "good" / "broken.png").write_bytes(b"\x89PNG garbage")
    Image.new("RGB", (5, 5)).save(data / "tile" / "train" / "good" / "tiny.bmp")
    assert main(["train", "--data", str(data), "--model", "patchcore", "--config", str(cfg_file),
                 "--registry", str(tmp_path / "reg")]) == 0
    err = capsys.readouterr().err
    assert "broken.png" in err and "not a readable image" in err
    fit = json.loads(next((tmp_path / "reg" / "versions").glob("v*/fit.json")).read_text())
    assert len(fit["skipped"]) == 1


def test_clear_errors(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "neither a model version directory nor a registry" in capsys.readouterr().err
