"""The Dagster UI as users use it: headless Chromium (Debian's package, driven by Playwright) over `animl ui`
on a demo home opens the asset graph, materializes the dataset from the launchpad with a changed config and
opens the model's lineage. Screenshots land in $ANIML_TEST_ARTIFACTS/ui (default test-artifacts/ui)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from animl_assets.lineage import DATA_VERSION_TAG

from animl_assets_tests.conftest import REPO, dagster_ui

pytestmark = [pytest.mark.slow, pytest.mark.browser]
GROUPS = ("ingest", "detections", "dataset", "training", "evaluation", "registry", "inference")
STATUS = re.compile(r"^(Success|Failure|Canceled)$")
RUN_TIMEOUT_MS = 300_000


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "Chromium is not installed (Debian: apt-get install chromium)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def screenshots() -> Path:
    folder = Path(os.environ.get("ANIML_TEST_ARTIFACTS") or REPO / "test-artifacts") / "ui"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """(base URL of `animl ui`, demo home): the demo's champion, served by dagster dev on 127.0.0.1."""
    home = tmp_path_factory.mktemp("ui") / "home"
    env = {**os.environ, "ANIML_HOME": str(home), "DAGSTER_HOME": ""}
    demo = subprocess.run([str(Path(sys.executable).with_name("animl")), "demo"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    with dagster_ui(home, home.parent / "dagster-dev.log") as base:
        yield base, home


@pytest.fixture(scope="module")
def page(ui):
    """A Chromium page; Dagster's one-time community dialog is skipped whenever it shows."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium())
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(60_000)
        page.add_locator_handler(page.get_by_text("Join the Dagster community"),
                                 lambda _: page.get_by_role("button", name="Skip").click())
        yield page
        browser.close()


def _instance(home: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(home / "dagster"))


def _editor_text(page) -> str:
    return page.evaluate("() => document.querySelector('.CodeMirror').CodeMirror.getValue()")


def _leave_out(page, label: str) -> str:
    """Type ``- label`` as a new last entry of excluded_classes in the launchpad's editor, as a user would
    (again if the launchpad re-renders its config meanwhile); returns the editor's text."""
    for _ in range(3):
        page.evaluate("""() => {
            const cm = document.querySelector('.CodeMirror').CodeMirror;
            const lines = cm.getValue().split('\\n');
            const i = lines.findIndex(l => l.trim() === '- setup');
            cm.focus();
            cm.setCursor({line: i, ch: lines[i].length});
        }""")
        page.keyboard.press("Enter")
        page.keyboard.type(f"- {label}")
        page.wait_for_timeout(1000)
        if f"- {label}" in _editor_text(page):
            break
    return _editor_text(page)


def test_the_asset_graph_shows_every_stage(ui, page, screenshots):
    base, _ = ui
    page.goto(f"{base}/asset-groups")
    for group in GROUPS:
        page.get_by_text(group, exact=True).first.wait_for()
    page.screenshot(path=screenshots / "1-asset-graph.png")
    assert page.title() == "Global asset lineage"


def test_the_dataset_materializes_from_the_launchpad_with_a_changed_config(ui, page, screenshots):
    base, home = ui
    instance = _instance(home)
    before = instance.get_latest_materialization_event(dg.AssetKey("classification_dataset"))
    labels_before = before.asset_materialization.metadata["num_labels"].value

    page.goto(f"{base}/assets/classification_dataset")
    page.locator("button", has_text="Materialize").first.click(modifiers=["Shift"])  # shift-click: launchpad
    page.locator(".CodeMirror").wait_for()
    page.get_by_text("No errors").wait_for()  # the default config is scaffolded and valid
    config = _leave_out(page, "turkey")
    assert "\n        - setup\n        - turkey\n" in config, config
    page.get_by_text("No errors").wait_for()  # the launchpad validated the edited config
    page.screenshot(path=screenshots / "2-launchpad.png")
    page.locator("button", has_text="Materialize").last.click()

    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
    run_id = page.url.rsplit("/", 1)[1].split("?")[0]
    status = page.get_by_text(STATUS).first
    status.wait_for(timeout=RUN_TIMEOUT_MS)
    page.screenshot(path=screenshots / "3-run.png")
    assert status.inner_text() == "Success", (home.parent / "dagster-dev.log").read_text()[-4000:]

    run = instance.get_run_by_id(run_id)
    assert run.status == dg.DagsterRunStatus.SUCCESS and run.tags.get("dagster/from_ui") == "true"
    assert "turkey" in run.run_config["ops"]["classification_dataset"]["config"]["excluded_classes"]
    after = instance.get_latest_materialization_event(dg.AssetKey("classification_dataset"))
    assert after.run_id == run_id
    assert after.asset_materialization.metadata["num_labels"].value == labels_before - 1
    versions = [event.asset_materialization.tags[DATA_VERSION_TAG] for event in (before, after)]
    assert versions[0] != versions[1]  # a new immutable dataset version


def _shown(label: str, asset: str) -> bool:
    """Whether a node label is the asset's name, or its name shortened with an ellipsis (zoomed out)."""
    head, ellipsis, tail = label.partition("…")
    return label == asset or bool(ellipsis) and asset.startswith(head) and asset.endswith(tail)


def test_the_models_lineage_reaches_back_to_the_export(ui, page, screenshots):
    base, _ = ui
    page.goto(f"{base}/assets/champion_model")
    page.get_by_role("tab", name="Lineage").click()
    page.get_by_text("Upstream", exact=True).click()
    page.get_by_text("All", exact=True).click()
    page.wait_for_url(re.compile(r"lineageScope=upstream"))
    page.get_by_text("classifier_checkpoint", exact=True).wait_for()
    nodes = page.locator("[class*=AssetNode_assetName]")
    chain = ("champion_model", "registered_model", "classifier_evaluation", "classifier_checkpoint", "splits",
             "classification_dataset", "crops", "md_detections", "images", "cct_export")

    def missing() -> list[str]:  # the graph draws the nodes in view only
        labels = nodes.all_inner_texts()
        return [asset for asset in chain if not any(_shown(label, asset) for label in labels)]

    page.mouse.move(800, 600)
    page.keyboard.down("Control")  # ctrl + wheel zooms out, step by step, until the whole chain is in view
    for _ in range(20):
        if not missing():
            break
        page.mouse.wheel(0, 100)
        page.wait_for_timeout(300)
    page.mouse.wheel(0, 100)
    page.keyboard.up("Control")
    page.wait_for_timeout(500)
    page.screenshot(path=screenshots / "4-model-lineage.png")
    assert missing() == [], nodes.all_inner_texts()
    assert not any(_shown(label, "classifications") for label in nodes.all_inner_texts())  # upstream only
