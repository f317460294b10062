"""The main job end to end, small: a client of the stack (the session's Label Studio, the live loop,
two policies, a retraining started from Label Studio)."""

import json

import pytest

from defectloop.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow


def test_demo_runs_the_loop_through_the_stack(label_studio, tmp_path):
    cfg = DemoConfig(out=label_studio.root / "demo", rounds=2, batch=5, steps=100, retrain_every=2, n_train=12,
                     n_test_good=30, n_test_bad=6, image_size=128, strength=(0.85, 0.85), drift=0.0, parity=True)
    # plain defects, no glare: this checks the plumbing, not the (harder) default data
    result = run_demo(cfg, str(tmp_path / "rounds.json"), studio=label_studio)
    rounds = json.loads((tmp_path / "rounds.json").read_text())["rounds"]
    assert rounds == json.loads(json.dumps(result["rounds"]))
    keys = {"round", "policy", "shown", "anomalies_found", "image_auroc", "pixel_auroc", "batch_image_auroc", "per_category"}
    assert all(keys <= set(r) for r in rounds)
    assert all(set(r["per_category"]) == {"tile", "disc", "mesh"} and 0 <= r["batch_image_auroc"] <= 1 for r in rounds)
    assert cfg.policy == "adaptive"  # the default
    main = [r for r in rounds if r["policy"] == cfg.policy]
    rand = [r for r in rounds if r["policy"] == "random"]
    assert [r["round"] for r in main] == [0, 1, 2] and [r["round"] for r in rand] == [0, 1, 2]
    # the most anomalous (of each category in turn) first finds the defects a random order does not
    assert main[1]["anomalies_found"] >= 4 and sum(r["anomalies_found"] for r in main) > sum(r["anomalies_found"] for r in rand)
    # the labels reached the served bank through the live loop, and the retraining was judged
    assert main[1]["model_version"].startswith("v0001-b")
    retrained = main[2]["retraining"]
    assert retrained["state"] in ("promoted", "kept"), retrained
    assert main[2]["model_version"].startswith("v0002" if retrained["state"] == "promoted" else "v0001")
    for r in (main[-1], rand[-1]):  # one current prediction on every task, and the queue audited
        q = r["queue"]
        assert q["max_predictions_per_task"] == 1 and q["tasks_without_prediction"] == 0, q
        assert set(q["open_normals_flagged"]) == {"tile", "disc", "mesh"}
    assert (cfg.out / "learning_curve.png").stat().st_size > 10_000
    assert not list(cfg.out.glob("stack-*/stack.json"))  # every stack was stopped
