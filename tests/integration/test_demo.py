"""The main job end to end, small: its own Label Studio and scorer, two policies, a retraining."""

import json

import pytest

from defectloop.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow


def test_demo_runs_the_loop(tmp_path):
    cfg = DemoConfig(out=tmp_path / "demo", rounds=2, batch=5, steps=100, retrain_every=2, n_train=12,
                     n_test_good=30, n_test_bad=6, image_size=128)
    result = run_demo(cfg, str(tmp_path / "rounds.json"))
    rounds = json.loads((tmp_path / "rounds.json").read_text())["rounds"]
    assert rounds == json.loads(json.dumps(result["rounds"]))
    keys = {"round", "policy", "shown", "anomalies_found", "image_auroc", "pixel_auroc"}
    assert all(keys <= set(r) for r in rounds)
    assert cfg.policy == "per-category"  # the default
    main = [r for r in rounds if r["policy"] == cfg.policy]
    rand = [r for r in rounds if r["policy"] == "random"]
    assert [r["round"] for r in main] == [0, 1, 2] and [r["round"] for r in rand] == [0, 1, 2]
    # the most anomalous (of each category in turn) first finds the defects a random order does not
    assert main[1]["anomalies_found"] >= 4 and sum(r["anomalies_found"] for r in main) > sum(r["anomalies_found"] for r in rand)
    assert main[2]["model_version"] == "v0002"  # retrained after round 2
    assert (tmp_path / "demo" / "learning_curve.png").stat().st_size > 10_000


def test_a_failed_retraining_leaves_the_demo_on_the_served_version(served_registry, tmp_path, capsys):
    """The retraining runs as a child process: its failure is reported, and nothing is registered."""
    import shutil

    from defectloop.demo import retrain_job
    from defectloop.registry import Registry

    root = tmp_path / "reg"
    shutil.copytree(served_registry, root)
    assert not retrain_job(root, tmp_path / "no-such-pool")
    assert "the retraining failed with exit status 1" in capsys.readouterr().out
    assert Registry(root).ids() == ["v0001"] and Registry(root).current() == "v0001"
