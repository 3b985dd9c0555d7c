"""The Airflow UI in a real headless Chromium (Debian's ``chromium``, driven by Playwright): log in, open the
tabular pipeline, trigger it with changed Params from the trigger form, wait for success, find the gate decision's
link on the gate task's page, and keep screenshots of the filled form, the finished run and the gate task under
``var/test-artifacts/``.

No browser is downloaded: Playwright launches the system Chromium by its path (``make chromium`` installs it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from airflow_client.client.api.dag_run_api import DagRunApi
from kiln_service import Platform, running_service
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect, sync_playwright

from kiln.tasks.settings import get_settings
from kiln.tasks.storage.artifacts import read_json, run_key

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "var" / "test-artifacts"
DAG_ID = "penguins_species"
FORM_VALUES = {"Epochs": ("epochs", 3), "Worker processes": ("nproc", 1)}
"""Trigger-form field label -> (Param name, value): few epochs on one rank keep the run short."""
# Tall enough for the whole trigger dialog (about 1,500 px): a taller dialog scrolls inside its own container,
# which element and full-page screenshots both cut off. The UI's pages fill the viewport, so a "full page" is it.
VIEWPORT = {"width": 1600, "height": 1700}
UI_TIMEOUT_MS = 60_000  # generous: the api-server shares two cores with the pipeline's tasks and other tests
RUN_TIMEOUT_S = 600.0

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (run `make chromium`)"),
    # Above the suite's 600 s: start-up, a run allowed RUN_TIMEOUT_S (whose timeout reports the log tails), stop.
    pytest.mark.timeout(RUN_TIMEOUT_S + 600),
]


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    """The platform's services with the penguins pipeline only."""
    with running_service(tmp_path, specs=[REPO / "dags" / "pipelines" / f"{DAG_ID}.yaml"]) as running:
        yield running


@pytest.fixture
def page() -> Iterator[Page]:
    """A fresh page in a headless system Chromium (no stored login, default views)."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(UI_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def _screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    log.info("screenshot: %s", path)
    return path


def _log_in(page: Page, platform: Platform) -> None:
    """Open the DAG's page; the UI redirects to SimpleAuthManager's login page and back after signing in."""
    page.goto(f"{platform.url}/dags/{DAG_ID}")
    page.get_by_label("Username").fill(platform.username)
    page.get_by_label("Password").fill(platform.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**/dags/{DAG_ID}")


def _trigger_with_form(page: Page) -> None:
    """Fill the trigger dialog's Run Parameters, screenshot it, submit; the UI then opens the new run's page."""
    # The header button is labelled "Trigger Dag" (aria-label); the dialog's submit button is also "Trigger".
    page.get_by_role("button", name="Trigger Dag").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_role("button", name="Run Parameters")).to_be_visible(timeout=UI_TIMEOUT_MS)
    for label, (_, value) in FORM_VALUES.items():
        field = dialog.get_by_label(label)  # labels carry the Params' titles
        field.fill(str(value))
        # Chakra's number input commits a typed value to the form state on blur, not on input.
        field.blur()
        expect(field).to_have_value(str(value), timeout=UI_TIMEOUT_MS)
    _screenshot(page, "ui_penguins_trigger_form.png")
    dialog.get_by_test_id("trigger-dag-submit").click()  # a test id: "Trigger" also names the header button
    expect(dialog).to_be_hidden(timeout=UI_TIMEOUT_MS)
    page.wait_for_url(f"**/dags/{DAG_ID}/runs/**")


def _open_run_page(page: Page, platform: Platform, run_id: str, state: str) -> None:
    """Open the finished run's page (grid view) and wait until it shows the run in ``state`` and its tasks."""
    page.goto(f"{platform.url}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}")
    page.get_by_role("button", name="Show Grid").click()
    heading = page.get_by_role("heading", name=run_id, exact=True)
    expect(heading).to_be_visible(timeout=UI_TIMEOUT_MS)
    # The run's state badge is a sibling of its heading; every task row has a badge of its own.
    badge = heading.locator("xpath=..").get_by_test_id("state-badge")
    expect(badge).to_have_text(state.capitalize(), timeout=UI_TIMEOUT_MS)
    train_row = page.get_by_role("row").filter(has=page.get_by_role("link", name="train", exact=True))
    expect(train_row).to_be_visible(timeout=UI_TIMEOUT_MS)


def _open_gate_task(page: Page, platform: Platform, run_id: str) -> str:
    """Open the run's ``gate`` task page; return the href of its "Gate decision" extra-link button."""
    page.goto(f"{platform.url}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}/tasks/gate")
    page.get_by_text("Details", exact=True).first.click()  # the UI lists a task's "Extra Links" on this tab
    link = page.get_by_role("link", name="Gate decision")
    expect(link).to_be_visible(timeout=UI_TIMEOUT_MS)
    expect(page.get_by_role("link", name="MLflow run")).to_be_visible(timeout=UI_TIMEOUT_MS)
    return link.get_attribute("href") or ""


def test_trigger_from_ui_with_changed_params(platform: Platform, page: Page) -> None:
    """Params changed in the UI's trigger form reach the run's conf and its training step; the run succeeds."""
    runs = DagRunApi(platform.api)
    before = {r.dag_run_id for r in runs.get_dag_runs(DAG_ID, limit=100).dag_runs}
    try:
        _log_in(page, platform)
        _trigger_with_form(page)
        newest = runs.get_dag_runs(DAG_ID, order_by=["-run_after"], limit=1).dag_runs
        assert newest and newest[0].dag_run_id not in before, f"no new {DAG_ID} run after submitting the form"
        run_id = newest[0].dag_run_id
        assert unquote(page.url).endswith(f"/runs/{run_id}"), f"the UI opened {page.url}, not the new run {run_id}"
        state = platform.wait(DAG_ID, run_id, timeout=RUN_TIMEOUT_S)
        _open_run_page(page, platform, run_id, state)
        _screenshot(page, "ui_penguins_run.png")
        # The run's outputs from its task pages: the gate's buttons lead to the decision record in MLflow.
        gate_href = _open_gate_task(page, platform, run_id)
        _screenshot(page, "ui_penguins_gate.png")
    except (PlaywrightError, AssertionError, TimeoutError) as exc:
        shot = _screenshot(page, "ui_penguins_failure.png")
        raise AssertionError(f"{exc}\nscreenshot: {shot}\n{platform.service.log_tails()}") from exc
    assert gate_href.startswith(platform.service.mlflow_url) and gate_href.endswith("gate/decision.json"), gate_href

    run = runs.get_dag_run(DAG_ID, run_id)
    sent = dict(FORM_VALUES.values())
    assert {k: (run.conf or {}).get(k) for k in sent} == sent, f"the form's values did not reach the conf: {run.conf}"
    assert state == "success", f"run {run_id} ended {state}\n{platform.service.log_tails()}"
    run_dir = Path(get_settings(platform.service.env).artifact_root) / run_key(DAG_ID, run_id)
    trained = read_json(run_dir / "train" / "train_metrics.json")
    assert (trained["epochs_run"], trained["world_size"]) == (sent["epochs"], sent["nproc"])
