"""The labeling loop against a real Label Studio: project bootstrap, predictions that order the
queue, annotations flowing into the abnormal bank (idempotent, edits, deletions), Label Studio
killed and restarted mid-loop."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from label_studio_sdk import LabelStudio

from defectloop.data import load_image, load_mask, load_split
from defectloop.labeling.brush import BrushRLE
from defectloop.labeling.client import StudioClient
from defectloop.labeling.feedback import Feedback, Verdict
from defectloop.labeling.predict import PoolPredictor
from defectloop.labeling.project import MOST_ANOMALOUS_TAB, LabelingProject, PoolImage
from defectloop.labeling.sync import Sync
from defectloop.memory import Provenance
from defectloop.registry import Registry

pytestmark = pytest.mark.slow


def brush(mask: np.ndarray, label: str = "scratch") -> dict:
    h, w = mask.shape
    return {"type": "brushlabels", "from_name": "defect", "to_name": "image", "original_width": w,
            "original_height": h, "value": {"format": "rle", "rle": BrushRLE().encode(mask), "brushlabels": [label]}}


def mesh_pool(folder: Path, tiny_data: Path) -> tuple[list[PoolImage], dict]:
    """The mesh test images in ``folder`` (below Label Studio's document root) as a pool, and the
    sample behind each file name."""
    folder.mkdir()
    truth = {}
    for s in load_split(tiny_data).test:
        if s.category == "mesh":
            shutil.copy(s.path, folder / f"{s.defect}_{s.path.name}")
            truth[f"{s.defect}_{s.path.name}"] = s
    return [PoolImage(str(folder / name), "mesh") for name in sorted(truth)], truth


def test_labeling_loop_with_label_studio(label_studio, served_registry, tiny_data, tmp_path):
    # the pool: one category's test images, below Label Studio's document root
    pool_dir = label_studio.root / "loop-pool"
    samples = {}
    for s in load_split(tiny_data).test:
        if s.category == "disc":
            dst = pool_dir / f"{s.defect}_{s.path.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(s.path, dst)
            samples[dst.name] = s
    pool = [PoolImage(str(pool_dir / name), s.category) for name, s in sorted(samples.items())]
    project = LabelingProject.create(label_studio.url, label_studio.token, "loop", pool, ["scratch", "blob"],
                                     document_root=label_studio.root)
    tasks = list(project.tasks())
    tasks_by_id = {t["id"]: t for t in tasks}
    assert len(tasks) == len(pool) and all(t["data"]["category"] == "disc" for t in tasks)
    sample_of = {t["id"]: samples[t["data"]["image"].rsplit("%2F", 1)[-1].rsplit("/", 1)[-1]] for t in tasks}

    root = tmp_path / "reg"
    shutil.copytree(served_registry, root)
    reg = Registry(root)
    model = reg.load()
    studio = StudioClient(label_studio.url, label_studio.token, retries=1)
    predictor = PoolPredictor(model, tasks, lambda t: studio.fetch(t["data"]["image"], t["id"]),
                              project.config)
    project.push_predictions(predictor.predictions(model), reg.label())
    assert project.model_version() == "v0001"

    # the "Most anomalous first" tab shows defective images first
    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    tab = next(v for v in ls.views.list(project=project.id) if v.data.get("title") == MOST_ANOMALOUS_TAB)
    shown = [t.id for t in ls.tasks.list(project=project.id, view=tab.id)][:4]
    assert all(sample_of[i].label == 1 for i in shown), [sample_of[i].defect for i in shown]

    feedback = Feedback(model, tmp_path / "state" / "ledger.json",
                        lambda v: load_image(studio.fetch(v.image, v.task_id)))
    sync = Sync(project, feedback, tmp_path / "state" / "cursor.json", publish=lambda: reg.publish_bank(model))
    top, good = shown[0], next(i for i in sample_of if sample_of[i].label == 0)
    gt = load_mask(sample_of[top].mask_path)
    ann = ls.annotations.create(id=top, result=[brush(gt)])
    ls.annotations.create(id=good, result=[{"type": "choices", "from_name": "verdict", "to_name": "image",
                                            "value": {"choices": ["normal"]}}])
    before = len(model.abnormal_bank)
    report = sync.run()
    assert (report.applied, report.bank_changed, report.published) == (2, True, "v0001-b0001")
    added = len(model.abnormal_bank) - before
    assert added > 0 and reg.label() == "v0001-b0001"
    assert feedback.ledger[str(ann.id)]["kind"] == "mask" and feedback.ledger[str(ann.id)]["mask_pixels"] == gt.sum()

    again = sync.run()  # nothing new: nothing applied twice
    assert (again.applied, again.bank_changed, len(model.abnormal_bank) - before) == (0, False, added)

    small = np.zeros_like(gt)
    ys, xs = np.nonzero(gt)
    small[ys.min():ys.min() + 16, xs.min():xs.min() + 16] = True
    ls.annotations.update(id=ann.id, result=[brush(small)])
    edited = sync.run()
    assert edited.applied == 1 and edited.published == "v0001-b0002"
    held = len(model.abnormal_bank) - before
    image = feedback.load_image(Verdict(str(ann.id), top, tasks_by_id[top]["data"]["image"], "disc", "mask"))
    assert held == model.confirm(Provenance("probe", "probe"), image, small) > 0  # replaced, not added
    assert model.forget("probe")

    # Label Studio dies mid-loop: the sync reports and changes nothing; after a restart it resumes
    label_studio.kill()
    with pytest.raises(Exception):  # noqa: B017 - whatever the HTTP client raises on a refused connection
        sync.run()
    assert reg.label() == "v0001-b0002"
    label_studio.restart("/health")
    ls.annotations.delete(id=ann.id)
    deleted = sync.run()
    assert deleted.applied == 1 and deleted.published == "v0001-b0003"
    assert len(model.abnormal_bank) == before and f"ls:{ann.id}" not in model.abnormal_bank
    assert Registry(root).load().abnormal_bank.annotations == model.abnormal_bank.annotations

    # re-prediction under the new label: only the scorer runs again; every prediction is replaced
    # (one request), one per task, and a second push writes nothing
    assert project.push_predictions(predictor.predictions(model), reg.label()) == len(tasks)
    assert project.model_version() == "v0001-b0003"
    preds = list(ls.predictions.list(project=project.id))
    assert sorted(p.task for p in preds) == sorted(tasks_by_id) and {p.model_version for p in preds} == {"v0001-b0003"}
    assert project.push_predictions(predictor.predictions(model), reg.label()) == 0
    project.forget_predictions()  # as a reconcile does: Label Studio's copies read back say the same
    assert project.push_predictions(predictor.predictions(model), reg.label()) == 0


def test_label_cli(label_studio, served_registry, tiny_data, tmp_path, monkeypatch, capsys):
    """init -> round -> an annotation and a START_TRAINING webhook event -> sync retrains -> status."""
    from defectloop.cli import main
    from defectloop.labeling.inbox import EventInbox

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    pool = label_studio.root / "cli-pool"
    for s in load_split(tiny_data).test:
        if s.category in ("tile", "mesh"):
            dst = pool / s.category / f"{s.defect}_{s.path.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(s.path, dst)
    root = tmp_path / "reg"
    shutil.copytree(served_registry, root)
    state = tmp_path / "state"
    assert main(["label", "init", "--state", str(state), "--url", label_studio.url, "--registry", str(root),
                 "--pool", str(pool), "--document-root", str(label_studio.root), "--defects", "scratch,blob",
                 "--batch", "4", "--retrain-after", "0"]) == 0
    assert "22 tasks" in capsys.readouterr().out
    assert main(["label", "round", "--state", str(state)]) == 0
    picked = [int(x) for x in capsys.readouterr().out.rsplit(":", 1)[1].split(",")]
    assert len(picked) == 4

    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    task = ls.tasks.get(id=picked[0])
    image = load_image(StudioClient(label_studio.url, label_studio.token).fetch(task.data["image"], task.id))
    mask = np.zeros(image.shape[:2], bool)
    mask[20:60, 20:60] = True
    ls.annotations.create(id=picked[0], result=[brush(mask)])
    normal = ls.tasks.get(id=picked[1])
    ls.annotations.create(id=picked[1], result=[{"type": "choices", "from_name": "verdict", "to_name": "image",
                                                 "value": {"choices": ["normal"]}}])
    inbox = EventInbox(tmp_path / "inbox")
    inbox.put({"action": "ANNOTATION_CREATED", "annotation": {"id": 1}})
    inbox.put({"action": "START_TRAINING"})
    assert main(["label", "sync", "--state", str(state), "--inbox", str(inbox.folder), "--data", str(tiny_data),
                 "--hold-back", "0"]) == 0
    out = capsys.readouterr().out
    assert "1 webhook event(s), 2 annotation change(s)" in out and "START_TRAINING" in out
    assert "retraining promoted" in out and "v0002 is served because its job succeeded" in out
    reg = Registry(root)
    assert inbox.pending() == [] and len(inbox.rejected()) == 1  # the event without a task: set aside, with why
    assert reg.current() == "v0002"
    # the retraining learned from both: the confirmed mask, and the image confirmed normal (from the pool)
    assert reg.labels("normal") == [{"source": normal.data["source"], "category": normal.data["category"],
                              "image": normal.data["image"]}]
    assert normal.data["source"].startswith(str(pool)) and Path(normal.data["source"]).is_file()
    fit = json.loads(reg.store.read_text("versions/v0002/fit.json"))
    assert fit["carried_annotations"] == 1 and fit["confirmed_normals"] == 1
    assert main(["label", "status", "--state", str(state)]) == 0
    status = capsys.readouterr().out
    assert "2 labeled (1 with masks, 0 anomalous without, 1 normal)" in status and "model v0002" in status


def test_loop_waits_for_the_scorer(label_studio, served_registry, tiny_data, tmp_path):
    """The scorer connected as ML backend (its webhook authenticated), serving each bank the loop
    publishes; killed during a round: the loop retries, reports, loses nothing, and picks it up again."""
    import os
    import sys
    import threading

    from defectloop.labeling.loop import LabelingLoop
    from defectloop.labeling.policies import make_policy
    from defectloop.labeling.scorer import ScorerClient
    from defectloop.process import ManagedProcess, free_port

    pool, truth = mesh_pool(label_studio.root / "scorer-pool", tiny_data)
    root = tmp_path / "reg"
    shutil.copytree(served_registry, root)
    token, port = "loop-token", free_port()
    scorer = ManagedProcess("scorer", [sys.executable, "-m", "defectloop.cli", "serve", "--registry", str(root),
                                       "--port", str(port)],
                            {**os.environ, "DEFECTLOOP_API_TOKEN": token, "DEFECTLOOP_POLL_S": "0.5",
                             "DEFECTLOOP_THREADS": "2", "RAY_USAGE_STATS_ENABLED": "0"},
                            f"http://127.0.0.1:{port}", tmp_path / "scorer.log")
    scorer.start().wait_ready("/v1/health", 180)
    try:
        project = LabelingProject.create(label_studio.url, label_studio.token, "scorer", pool, ["scratch", "blob"],
                                         document_root=label_studio.root)
        project.connect_scorer(scorer.url, token)
        ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
        hooks = [w for w in ls.webhooks.list(project=str(project.id)) if w.url == f"{scorer.url}/ls/webhook"]
        assert len(hooks) == 1 and hooks[0].headers == {"Authorization": f"Bearer {token}"}

        loop = LabelingLoop(project, Registry(root), tmp_path / "state", make_policy("top"), batch=4,
                            scorer=ScorerClient(scorer.url, token), scorer_wait_s=60)
        name_of = {t["id"]: t["data"]["image"].rsplit("%2F", 1)[-1].rsplit("/", 1)[-1] for t in loop.tasks}
        bad = [t for t in loop.select() if truth[name_of[t]].label == 1]
        assert len(bad) >= 2

        # an annotation reaches the scorer's webhook (with the token Label Studio now sends)
        ls.annotations.create(id=bad[0], result=[brush(load_mask(truth[name_of[bad[0]]].mask_path))])
        pending = root / "inbox" / "pending"
        deadline = time.monotonic() + 30
        while not list(pending.glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        events = [json.loads(p.read_text()) for p in pending.glob("*.json")]
        assert [e["action"] for e in events] == ["ANNOTATION_CREATED"]

        first = loop.apply_feedback()
        assert first.scorer is not None and first.scorer.ok and first.scorer.served == loop.label == "v0001-b0001"

        # the scorer crashes during the round: the loop retries for its wait, then reports; nothing is lost
        scorer.kill()
        ls.annotations.create(id=bad[1], result=[brush(load_mask(truth[name_of[bad[1]]].mask_path))])
        loop.scorer_wait_s = 3
        t0 = time.monotonic()
        down = loop.apply_feedback()
        assert down.sync.applied == 1 and loop.label == Registry(root).label() == "v0001-b0002"
        assert not down.scorer.ok and "unreachable" in down.scorer.detail and time.monotonic() - t0 >= 3
        assert "nothing is lost" in str(down.scorer)
        assert loop.labeled() == {bad[0], bad[1]}

        # it comes back while the loop waits: the loop sees the newest label served
        loop.scorer_wait_s = 180
        threading.Timer(2.0, scorer.start).start()
        back = loop.check_scorer()
        assert back.ok and back.served == "v0001-b0002" and back.waited_s >= 2
    finally:
        assert scorer.stop() is not None


def test_confirmed_labels_move_their_category_threshold_at_once(label_studio, served_registry, tiny_data, tmp_path):
    """A pool image confirmed normal that the model called anomalous is normal evidence and raises
    its category's threshold at once: published as an update, pre-annotations flip for the images
    it covers. A confirmed defect then puts the threshold halfway between the two, each scored
    without the memory its own label added. Deleting the normal verdict gives the fitted threshold
    back (defects alone do not move it)."""
    from defectloop.labeling.loop import LabelingLoop
    from defectloop.labeling.policies import make_policy
    from defectloop.models import Calibration

    pool, truth = mesh_pool(label_studio.root / "recalibration-pool", tiny_data)
    root = tmp_path / "reg"
    shutil.copytree(served_registry, root)
    cal_path = root / "versions" / "v0001" / "calibration.json"
    fitted = Calibration.load(cal_path).shifted(-100.0)  # a version whose thresholds call every image anomalous
    fitted.save(cal_path)
    project = LabelingProject.create(label_studio.url, label_studio.token, "recalibration", pool, ["scratch"],
                                     document_root=label_studio.root)
    loop = LabelingLoop(project, Registry(root), tmp_path / "state", make_policy("top"), batch=4)
    loop.select()
    decisions = {t["id"]: t["data"]["decision"] for t in project.tasks()}
    assert set(decisions.values()) == {"anomalous"}

    name_of = {t["id"]: t["data"]["image"].rsplit("%2F", 1)[-1].rsplit("/", 1)[-1] for t in loop.tasks}
    ids = list(loop.predictor.task_ids)
    scores = dict(zip(ids, loop.predictor.raw_scores(loop.model, ids).tolist(), strict=True))
    normals = sorted((t for t in ids if truth[name_of[t]].label == 0), key=scores.get)
    confirmed = normals[len(normals) // 2]  # a normal in the middle: half the normals score above it
    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    ann = ls.annotations.create(id=confirmed, result=[{"type": "choices", "from_name": "verdict", "to_name": "image",
                                                       "value": {"choices": ["normal"]}}])
    timing = loop.apply_feedback()
    assert timing.sync.published == "v0001-b0001" and timing.sync.bank_changed  # the image is normal evidence
    served = Registry(root).load()
    assert len(served.normal_evidence.annotations) == 1
    # set on its score without its own evidence: what its look-alikes nobody labeled score
    assert served.calibration.threshold("mesh") == pytest.approx(scores[confirmed], abs=1e-5)
    assert served.calibration.get("mesh").labels == 1 and Registry(root).calibration() == fitted
    assert loop.label_thresholds() == {"mesh": {"fitted": fitted.threshold("mesh"), "threshold": served.calibration.threshold("mesh"),
                                                "labels": 1}}
    decisions = {t["id"]: t["data"]["decision"] for t in project.tasks()}
    now = dict(zip(ids, loop.predictor.raw_scores(loop.model, ids).tolist(), strict=True))
    assert now[confirmed] < scores[confirmed]  # its own evidence
    assert {t for t, d in decisions.items() if d == "anomalous"} == {t for t in ids if now[t] > served.calibration.threshold("mesh")}

    # a confirmed defect: scored without its own mask's entries too, the threshold goes halfway between the two
    defect = next(t for t in ids if truth[name_of[t]].label == 1)
    unlabeled = float(loop.predictor.raw_scores(loop.model, [defect])[0])
    ls.annotations.create(id=defect, result=[brush(load_mask(truth[name_of[defect]].mask_path))])
    assert loop.apply_feedback().sync.published == "v0001-b0002"
    assert float(loop.predictor.raw_scores(loop.model, [defect])[0]) > unlabeled  # its own entries
    both = loop.calibration_scores([confirmed, defect])
    assert float(both[1]) == pytest.approx(unlabeled, abs=1e-5)
    assert Registry(root).load().calibration.threshold("mesh") == pytest.approx(float(both.mean()), abs=1e-5)
    assert loop.label_thresholds()["mesh"]["labels"] == 2

    ls.annotations.delete(id=ann.id)
    timing = loop.apply_feedback()
    assert timing.sync.published == "v0001-b0003" and Registry(root).load().calibration == fitted
    assert set(t["data"]["decision"] for t in project.tasks()) == {"anomalous"} and loop.label_thresholds() == {}

    # three confirmed masks: the category's mask edge is set on them, each defect's map scored
    # without its own mask's entries, and served with the bank
    masked = sorted(t for t in ids if truth[name_of[t]].label == 1 and truth[name_of[t]].mask_path)[:3]
    assert defect in masked and len(masked) == 3
    for t in masked:
        if t != defect:
            ls.annotations.create(id=t, result=[brush(load_mask(truth[name_of[t]].mask_path))])
    loop.apply_feedback()
    cats, maps, masks = loop.mask_evidence()
    assert cats == ["mesh"] * 3 and [m.shape for m in masks] == [m.shape for m in maps] and len(maps) == 3
    for t, m, a in zip(masked, masks, maps, strict=True):  # the ledger's cells, at the maps' size, are the masks drawn
        drawn = torch.from_numpy(load_mask(truth[name_of[t]].mask_path))
        drawn = torch.nn.functional.adaptive_max_pool2d(drawn[None, None].float(), a.shape[-2:])[0, 0].bool()
        assert (m & drawn).sum() / (m | drawn).sum() > 0.9
    served = Registry(root).load().calibration
    assert served == fitted.with_mask_levels(cats, maps, masks)
    edge = served.get("mesh")
    assert loop.mask_edges() == ({"mesh": {"level": edge.mask_level, "masks": 3}} if edge.mask_level is not None else {})
    print("mesh mask edge:", edge.mask_level, served.methods()["mesh"])
