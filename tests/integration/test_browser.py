"""What an annotator sees, in a real browser: Debian's Chromium driven by Playwright (no browser
download), logged in to the stack's Label Studio."""

import os
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: flags for a closed network: no background connections, no sandbox as root
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "Debian's chromium is missing: `apt-get install chromium` (infra/dev.sh test does)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, timeout=60_000)
        yield b
        b.close()


@pytest.fixture()
def page(browser, label_studio, tmp_path):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{label_studio.url}/user/login/")
    page.fill("input[name=email]", label_studio.user)
    page.fill("input[name=password]", label_studio.password)
    page.click("button[type=submit]")
    page.wait_for_load_state("networkidle")
    assert "/user/login" not in page.url, "the login to Label Studio failed"
    yield page
    shots = os.environ.get("DEFECTLOOP_SCREENSHOTS")  # to look at what the test saw
    if shots:
        page.screenshot(path=str(Path(shots) / f"{int(time.time())}.png"))
    context.close()


def texts(page, selector: str) -> list[str]:
    return [t.strip() for t in page.locator(selector).all_inner_texts()]


def test_what_an_annotator_sees(stack, page, label_studio):
    """The open tab: only open tasks, in the tab's order, with thumbnail, category, score and decision
    on screen (no path that names the defect); a task opened from it carries one prediction, of the
    served version, with its mask labeled."""
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = stack.info["project_id"]
    tabs = {v.data["title"]: v for v in ls.views.list(project=project)}
    queue = tabs[next(t for t in tabs if t.startswith("Open:"))]
    assert "Reviewed" in tabs
    tasks = list(ls.tasks.list(project=project, fields="all"))
    if sum(1 for t in tasks if not t.annotations) < 4:  # other tests labeled the pool: reopen a few, as an annotator would
        for t in [t for t in tasks if t.annotations][:4]:
            for a in t.annotations:
                ls.annotations.delete(id=a["id"] if isinstance(a, dict) else a.id)
    page.goto(f"{label_studio.url}/projects/{project}/data?tab={queue.id}")
    page.wait_for_selector(".lsf-table__row-wrapper img")  # rows, with their thumbnails
    titles = [t.split("\n")[0] for t in texts(page, ".lsf-table__cell.lsf-th") if t]  # the title, not its type badge
    assert titles == ["ID", "Prediction score", "image", "category", "decision"], titles
    box = page.locator(".lsf-table__cell.lsf-th").filter(has_text="decision").bounding_box()
    assert box and box["x"] + box["width"] <= 1400, "the decision column needs scrolling"

    # the rows: the open tasks in the tab's order (Label Studio's own API agrees), scores shown to 3 decimals
    expected = [t.id for t in ls.tasks.list(project=project, view=queue.id, fields="task_only")]
    unlabeled = {t.id for t in ls.tasks.list(project=project, fields="task_only") if not t.total_annotations}
    assert set(expected) == unlabeled and len(expected) >= 4
    rows = [r.split() for r in texts(page, ".lsf-table__row-wrapper")]
    shown = [int(r[0]) for r in rows]
    assert shown == expected[:len(shown)]
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
    assert all(len(r[1].split(".")[-1]) <= 3 for r in rows)
    assert {r[-1] for r in rows} <= {"normal", "anomalous"}

    # the first task's pre-annotation: one prediction, the served version's, its mask labeled
    first = shown[0]
    predictions = list(ls.predictions.list(task=first))
    assert len(predictions) == 1
    page.goto(f"{label_studio.url}/projects/{project}/data?tab={queue.id}&task={first}")
    page.wait_for_selector("text=Regions")
    version = ls.projects.get(id=project).model_version
    assert page.get_by_text(version, exact=True).count() >= 1  # the prediction's tab names the served version
    config = ls.projects.get(id=project).label_config
    regions = page.locator("[class*='outliner'], [class*='regions']").first.inner_text()
    mask = predictions[0].result[0]
    if mask["type"] == "brushlabels":
        label = mask["value"]["brushlabels"][0]
        assert label in config and label in regions
