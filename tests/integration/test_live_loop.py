"""The live loop on the stack `defectloop up` starts (real Label Studio, local Ray, Ray Serve over
HTTP): annotations reach the served banks with no CLI call, exactly once, through crashes."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from label_studio_sdk import LabelStudio

from defectloop.data import load_image, load_mask
from defectloop.labeling.brush import BrushRLE
from defectloop.memory import Provenance
from defectloop.registry import Registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ls(stack):
    return LabelStudio(base_url=stack.info["label_studio_url"], api_key=stack.info["label_studio_token"])


STACK_DATA: list[Path] = []  # the stack's data folder, where the ground truth is


@pytest.fixture(scope="module")
def tasks(ls, stack):
    STACK_DATA[:] = [stack.data]
    found = {t.id: t for t in ls.tasks.list(project=stack.info["project_id"], fields="all")}
    # nothing the annotator sees names the defect: image URL and source are neutral names
    assert all("/test/" not in t.data["image"] and "/test/" not in t.data["source"] for t in found.values())
    return found


def banks(stack) -> dict:
    r = httpx.get(f"{stack.url}/v1/banks", headers={"Authorization": f"Bearer {stack.info['api_token']}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(stack, what: str, test, timeout: float = 60.0) -> dict:
    """Poll /v1/banks until ``test(body)``; a clear failure naming ``what`` otherwise."""
    deadline, body = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        body = banks(stack)
        if test(body):
            return body
        time.sleep(0.2)
    raise AssertionError(f"waited {timeout:.0f} s for {what}; /v1/banks: {body}")


def truth(task) -> Path:
    """The image's place in the data folder (the task's meta): what the annotator is not shown."""
    return Path(task.meta["path"])


def mask_of(task) -> np.ndarray:
    rel = truth(task)
    return load_mask(STACK_DATA[0] / rel.parts[0] / "ground_truth" / rel.parent.name / f"{rel.stem}_mask.png")


def brush(mask: np.ndarray, label: str, rle: list[int] | None = None) -> list[dict]:
    h, w = mask.shape
    return [{"type": "brushlabels", "from_name": "defect", "to_name": "image", "original_width": w,
             "original_height": h, "value": {"format": "rle", "rle": rle if rle is not None else BrushRLE().encode(mask),
                                             "brushlabels": [label]}}]


def defective(tasks, n: int, skip: int = 0) -> list:
    return [t for t in tasks.values() if truth(t).parent.name != "good"][skip:skip + n]


def entries_of(stack, annotation_id: int) -> tuple[int, int]:
    """(groups, entries) the served registry's bank holds for one annotation."""
    model = Registry(stack.state / "registry").load()
    feats, group, provs = model.abnormal_bank.tensors()
    idx = [i for i, p in enumerate(provs) if p.annotation_id == f"ls:{annotation_id}"]
    return len(idx), int(sum((group == i).sum() for i in idx))


def expected_entries(stack, task, mask: np.ndarray) -> int:
    """What one confirmation of this mask adds: the same model, the same image, confirmed once."""
    model = Registry(stack.state / "registry").load()
    return model.confirm(Provenance("probe", "probe"), load_image(task.data["source"]), mask)


def test_annotation_reaches_the_bank_with_no_cli_call(stack, ls, tasks):
    (task,) = defective(tasks, 1)
    cat, before = task.data["category"], banks(stack)
    mask = mask_of(task)
    t0 = time.monotonic()
    ann = ls.annotations.create(id=task.id, result=brush(mask, truth(task).parent.name))
    after = wait_for(stack, f"task {task.id}'s mask in the {cat} bank",
                     lambda b: b["categories"][cat]["abnormal"] > before["categories"][cat]["abnormal"])
    assert time.monotonic() - t0 < 10 and after["bank_version"] != before["bank_version"]
    assert after["model_version"] == before["model_version"] and after["pending_events"] is not None
    assert entries_of(stack, ann.id) == (1, expected_entries(stack, task, mask))
    # the pool was re-ranked, one current prediction per task, under the served model version
    wait_for(stack, "the loop to go idle", lambda b: b["loop"].get("pending_events") == 0)
    preds = ls.predictions.list(project=stack.info["project_id"])
    assert set(Counter(p.task for p in preds).values()) == {1}
    assert {p.model_version for p in preds} == {after["model_version"]}
    assert ls.projects.get(id=stack.info["project_id"]).model_version == after["model_version"]


def test_edit_delete_and_a_duplicate_webhook(stack, ls, tasks):
    (task,) = defective(tasks, 1, skip=1)
    cat, before = task.data["category"], banks(stack)["categories"][task.data["category"]]["abnormal"]
    mask = mask_of(task)
    ann = ls.annotations.create(id=task.id, result=brush(mask, "blob"))
    wait_for(stack, "the mask in the bank", lambda b: b["categories"][cat]["abnormal"] > before)
    full = entries_of(stack, ann.id)

    small = np.zeros_like(mask)
    ys, xs = np.nonzero(mask)
    small[ys.min():ys.min() + 12, xs.min():xs.min() + 12] = True
    ls.annotations.update(id=ann.id, result=brush(small, "blob"))
    want = expected_entries(stack, task, small)
    wait_for(stack, "the edit to replace the entries", lambda b: b["categories"][cat]["abnormal"] == before + want)
    assert entries_of(stack, ann.id) == (1, want) and want < full[1]

    # Label Studio delivers the same event again: nothing is added, no new bank version
    version = banks(stack)["bank_version"]
    stored = httpx.get(f"{stack.info['label_studio_url']}/api/annotations/{ann.id}",
                       headers={"Authorization": f"Token {stack.info['label_studio_token']}"}).json()
    event = {"action": "ANNOTATION_UPDATED", "project": {"id": stack.info["project_id"]}, "annotation": stored,
             "task": {"id": task.id, "data": dict(task.data)}}
    for _ in range(2):
        r = httpx.post(f"{stack.url}/ls/webhook", json=event, headers={"Authorization": f"Bearer {stack.info['api_token']}"})
        assert r.status_code == 201, r.text
    wait_for(stack, "the duplicates to be drained", lambda b: b["loop"].get("pending_events") == 0)
    time.sleep(1.5)  # a bank swap would have reached the scorer by now
    assert banks(stack)["bank_version"] == version and entries_of(stack, ann.id) == (1, want)

    ls.annotations.delete(id=ann.id)
    wait_for(stack, "the deletion to remove the entries", lambda b: b["categories"][cat]["abnormal"] == before)
    assert entries_of(stack, ann.id) == (0, 0)


def test_a_truncated_rle_is_quarantined_and_the_next_annotation_applies(stack, ls, tasks, capsys):
    bad_task, good_task = defective(tasks, 2, skip=2)
    mask = mask_of(bad_task)
    rle = BrushRLE().encode(mask)
    broken = ls.annotations.create(id=bad_task.id, result=brush(mask, "blob", rle=rle[:len(rle) // 3]))
    quarantined = wait_for(stack, "the truncated RLE in the quarantine",
                           lambda b: any(q.get("annotation") == str(broken.id) for q in b["quarantine"]))
    entry = next(q for q in quarantined["quarantine"] if q.get("annotation") == str(broken.id))
    assert "RLE" in entry["reason"] or "rle" in entry["reason"].lower()
    cat = good_task.data["category"]
    before = banks(stack)["categories"][cat]["abnormal"]
    ls.annotations.create(id=good_task.id, result=brush(mask_of(good_task), "blob"))
    wait_for(stack, "the next annotation in the bank", lambda b: b["categories"][cat]["abnormal"] > before)
    assert any(q.get("annotation") == str(broken.id) for q in banks(stack)["quarantine"])  # still listed
    from defectloop.cli import main

    assert main(["label", "status", "--state", str(stack.state / "label"), "--token", stack.info["label_studio_token"]]) == 0
    out = capsys.readouterr().out
    assert f"annotation {broken.id} (task {bad_task.id}): ValueError: brush RLE" in out


def test_nothing_lost_or_doubled_through_a_loop_kill_and_a_label_studio_restart(stack, ls, tasks, label_studio):
    first, second = defective(tasks, 2, skip=4)
    pid = wait_for(stack, "the loop's pid", lambda b: b["loop"].get("pid"))["loop"]["pid"]
    ann1 = ls.annotations.create(id=first.id, result=brush(mask_of(first), "blob"))
    os.kill(pid, signal.SIGKILL)  # mid-event: the webhook has answered, the loop may be half-way
    wait_for(stack, "Serve to replace the killed loop replica", lambda b: b["loop"].get("pid") not in (None, pid),
             timeout=120)
    label_studio.restart("/health")  # while annotating: what the webhooks could not deliver, the sync finds
    ann2 = ls.annotations.create(id=second.id, result=brush(mask_of(second), "blob"))
    for task, ann in ((first, ann1), (second, ann2)):
        want = expected_entries(stack, task, mask_of(task))
        deadline = time.monotonic() + 90
        while entries_of(stack, ann.id) != (1, want) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert entries_of(stack, ann.id) == (1, want), f"annotation {ann.id}: {entries_of(stack, ann.id)}, want (1, {want})"
    inbox = Path(Registry(stack.state / "registry").location) / "inbox"
    wait_for(stack, "the inbox to drain", lambda b: b["pending_events"] == 0 and not list((inbox / "pending").glob("*")))


def post_event(stack, event: dict) -> None:
    r = httpx.post(f"{stack.url}/ls/webhook", json=event, headers={"Authorization": f"Bearer {stack.info['api_token']}"})
    assert r.status_code == 201, r.text


def retrained(stack, job_before) -> dict:
    """Wait for the retraining started after ``job_before`` to be judged (promoted, kept or failed)."""
    return wait_for(stack, "the retraining to finish and be judged",
                    lambda b: b["retraining"] and b["retraining"]["job"] not in (None, job_before)
                    and b["retraining"]["state"] in ("promoted", "kept", "failed"), timeout=300)["retraining"]


def test_a_failed_or_worse_retraining_keeps_the_served_version(stack, ls, tasks):
    """START_TRAINING runs the retraining as a Ray job; a failed job and a version that does worse on
    the held-back confirmed labels leave the served version in place, with the reason in /v1/banks;
    a sound one is served."""
    from defectloop.models import held_back

    start = banks(stack)
    train_dirs = sorted(stack.data.glob("*/train"))
    # 1. the job fails: its training data is gone
    for d in train_dirs:
        d.rename(d.with_name("train-away"))
    try:
        post_event(stack, {"action": "START_TRAINING", "project": {"id": stack.info["project_id"]}})
        failed = retrained(stack, (start["retraining"] or {}).get("job"))
    finally:
        for d in train_dirs:
            d.with_name("train-away").rename(d)
    assert failed["state"] == "failed" and "failed" in failed["reason"], failed
    assert banks(stack)["model_version"] == start["model_version"]

    # 2. every task labeled (masks on the defective ones), some labels held back from the retraining
    labeled = {}
    for task in tasks.values():
        anomalous = truth(task).parent.name != "good"
        result = [{"type": "choices", "from_name": "verdict", "to_name": "image",
                   "value": {"choices": ["anomalous" if anomalous else "normal"]}}]
        if anomalous:
            result += brush(mask_of(task), "blob")
        labeled[task.id] = (ls.annotations.create(id=task.id, result=result), anomalous)
    held = {t: a for t, (_, a) in labeled.items() if held_back(tasks[t].data["image"], 0.2)}
    assert set(held.values()) == {True, False}, f"held-back labels of one kind only: {held}"
    wait_for(stack, "every label applied", lambda b: b["loop"].get("labeled_tasks", 0) >= len(tasks)
             and b["pending_events"] == 0, timeout=120)

    # 3. a worse version: the held-back defective images were dumped into the training normals
    dumped = []
    for t, anomalous in held.items():
        if anomalous:
            src = stack.data / truth(tasks[t])
            dumped.append(stack.data / tasks[t].data["category"] / "train" / "good" / f"dumped-{src.parent.name}-{src.name}")
            dumped[-1].write_bytes(src.read_bytes())
    try:
        post_event(stack, {"action": "START_TRAINING", "project": {"id": stack.info["project_id"]}})
        worse = retrained(stack, failed["job"])
    finally:
        for p in dumped:
            p.unlink()
    assert worse["state"] == "kept" and worse["candidate_auroc"] < worse["served_auroc"], worse
    assert "worse" in worse["reason"] and banks(stack)["model_version"] == start["model_version"]

    # 4. a sound retraining is served, and the held-back masks stay in its bank
    post_event(stack, {"action": "START_TRAINING", "project": {"id": stack.info["project_id"]}})
    sound = retrained(stack, worse["job"])
    assert sound["state"] == "promoted", sound
    served = wait_for(stack, "the scorer to serve the new version",
                      lambda b: b["model_version"] == sound["candidate"], timeout=120)
    registry = Registry(stack.state / "registry")
    before = {p.annotation_id for p in registry.load(start["model_version"]).abnormal_bank.annotations}
    held_masks = {f"ls:{labeled[t][0].id}" for t, a in held.items() if a} & before  # a mask may cover no patch
    assert held_masks and held_masks <= {p.annotation_id for p in registry.load().abnormal_bank.annotations}
    assert served["bank_version"] == registry.bank_version(sound["candidate"])


def test_tasks_imported_while_the_stack_is_up_join_the_ranking(stack, ls, tasks):
    """A task imported into Label Studio while the stack runs (a new image) is embedded, scored and
    gets its one prediction under the served version, with no CLI call: from the import's
    TASKS_CREATED webhook, or else the next reconcile."""
    from PIL import Image, ImageOps

    project = stack.info["project_id"]
    task = next(iter(tasks.values()))
    src = Path(task.data["source"])
    new = src.with_name(f"imported-{src.name}")
    ImageOps.mirror(Image.open(src)).save(new)  # another image: its content is not in any cache
    data = {k: v.replace(src.name, new.name) if isinstance(v, str) else v for k, v in task.data.items() if k != "decision"}
    before = {t.id for t in ls.tasks.list(project=project, fields="task_only")}
    ls.projects.import_tasks(id=project, request=[{"data": data}])
    (added,) = {t.id for t in ls.tasks.list(project=project, fields="task_only")} - before

    deadline, preds = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        preds = [p for p in ls.predictions.list(project=project) if p.task == added]
        if preds:
            break
        time.sleep(0.5)
    assert len(preds) == 1, f"waited 60 s for a prediction on the imported task {added}: {preds}"
    assert preds[0].model_version == banks(stack)["model_version"]
    assert [r for r in preds[0].result if r.get("type") == "choices"], preds[0].result  # a decision, at least
    # an import event naming a task deleted since (or never there) is drained, not retried for ever
    from defectloop.labeling.inbox import EventInbox

    inbox = EventInbox(stack.state / "registry" / "inbox")
    post_event(stack, {"action": "TASKS_CREATED", "project": {"id": project}, "tasks": [{"id": 10**7}]})
    assert inbox.pending(), "the event was not queued where the test looks"
    deadline = time.monotonic() + 30
    while inbox.pending() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not inbox.pending(), f"waited 30 s for the event naming a missing task to be drained: {inbox.pending()}"
