"""A demo home, looked at as users do: its event log and MLflow store (typed metadata, small previews, a
champion, MegaDetector JSON), then the Dagster UI in headless Chromium (Debian's package, driven by
Playwright) over `animl ui`: the asset graph, the dataset materialized from the launchpad with a changed
config, the model's lineage. Screenshots land in $ANIML_TEST_ARTIFACTS/ui (default test-artifacts/ui)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from animl_assets.assets.artifacts import THUMBNAIL_BYTES
from animl_assets.lineage import DATA_VERSION_TAG
from animl_assets_tests.conftest import REPO, dagster_ui, group_members, unavailable

pytestmark = pytest.mark.slow
browser = pytest.mark.browser
GROUPS = ("ingest", "detections", "dataset", "training", "evaluation", "registry", "inference")
STATUS = re.compile(r"^(Success|Failure|Canceled)$")
RUN_TIMEOUT_MS = 300_000
PATH_KEYS = {"path", "manifest", "source", "contact_sheet_path", "sample_grid_path"}
TABLE_KEYS = {"category_by_location", "failures", "crops_per_class", "crop_sizes", "crops_per_label",
              "conflicting_images", "crops_per_label_and_split"}
ROW_COUNTED = {"cct_export", "images", "md_detections", "crops", "classification_dataset"}


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        unavailable("Chromium is not installed (Debian: apt-get install chromium)")
    return found


@pytest.fixture(scope="module")
def screenshots() -> Path:
    folder = Path(os.environ.get("ANIML_TEST_ARTIFACTS") or REPO / "test-artifacts") / "ui"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory) -> Path:
    """ANIML_HOME after `animl demo`: a champion model and the sample export classified with it."""
    home = tmp_path_factory.mktemp("demo") / "home"
    env = {**os.environ, "ANIML_HOME": str(home), "DAGSTER_HOME": ""}
    demo = subprocess.run([str(Path(sys.executable).with_name("animl")), "demo"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    return home


UI_PROCESS: list[subprocess.Popen] = []  # the `animl ui` process of the module's one UI, for the last test


@pytest.fixture(scope="module")
def ui(demo_home):
    """(base URL of `animl ui` over the demo home, the home): dagster dev on 127.0.0.1. Dagster's one-time
    "Join the Dagster community" dialog is marked seen in the instance first (DAGSTER_HOME/.nux/nux.yaml, as
    its Skip button does): it can open over the launchpad at any moment, where nothing can dismiss it."""
    nux = demo_home / "dagster" / ".nux" / "nux.yaml"
    nux.parent.mkdir(parents=True, exist_ok=True)
    nux.write_text("seen: 1\n")
    UI_PROCESS.clear()
    with dagster_ui(demo_home, demo_home.parent / "dagster-dev.log", started=UI_PROCESS) as base:
        yield base, demo_home


@pytest.fixture(scope="module")
def page(ui):
    """A Chromium page."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium())
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def _instance(home: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(home / "dagster"))


def materializations(instance: dg.DagsterInstance) -> list[dg.AssetMaterialization]:
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey("crops")), limit=1)
    assert records.records, "nothing was materialized"
    events = []
    for key in instance.get_asset_keys():
        result = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=100)
        events += [record.asset_materialization for record in result.records]
    return events


def test_the_demo_event_log_holds_typed_metadata_and_no_large_images(demo_home):
    instance = dg.DagsterInstance.from_config(str(demo_home / "dagster"))
    events = materializations(instance)
    assert {event.asset_key.to_user_string() for event in events} >= ROW_COUNTED | {"splits"}
    for event in events:
        asset = event.asset_key.to_user_string()
        metadata = event.metadata
        for key, value in metadata.items():
            assert len(json.dumps(dg.serialize_value(value))) < THUMBNAIL_BYTES + 2_000, f"{asset}.{key} is large"
            if key in PATH_KEYS:
                assert isinstance(value, dg.PathMetadataValue), f"{asset}.{key} is {type(value).__name__}"
                assert Path(value.path).exists()
            if key in TABLE_KEYS:
                assert isinstance(value, dg.TableMetadataValue) and value.schema.columns, f"{asset}.{key}"
        if asset in ROW_COUNTED:
            assert isinstance(metadata["dagster/row_count"], dg.IntMetadataValue) and metadata["dagster/row_count"].value > 0
    crops = next(event for event in events if event.asset_key == dg.AssetKey("crops"))
    preview = crops.metadata["contact_sheet"]
    assert isinstance(preview, dg.MarkdownMetadataValue) and len(preview.value) <= THUMBNAIL_BYTES
    full = Path(crops.metadata["contact_sheet_path"].path)
    assert full.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and full.stat().st_size > THUMBNAIL_BYTES  # kept whole
    assert crops.metadata["dagster/row_count"].value == crops.metadata["num_crops"].value
    model = next(event for event in events if event.asset_key == dg.AssetKey("classifier_checkpoint"))
    assert model.metadata["test_acc_top1"].value >= 0.9  # the demo's model clearly learns the sample export
    assert isinstance(model.metadata["learning_curve"], dg.MarkdownMetadataValue)
    assert model.metadata["mlflow_run_id"].value and model.metadata["epochs_run"].value >= 1
    # the demo ends with a registered champion whose evaluation plots are in the UI and in MLflow
    evaluation = next(event for event in events if event.asset_key == dg.AssetKey("classifier_evaluation"))
    for figure in ("confusion_test", "confusion_val", "reliability_test", "errors_test"):
        assert isinstance(evaluation.metadata[figure], dg.MarkdownMetadataValue)
    champion = next(event for event in events if event.asset_key == dg.AssetKey("champion_model"))
    assert champion.metadata["champion_version"].value == 1
    from mlflow import MlflowClient

    from animl_assets.core.registry.tracking import embedded_tracking_uri

    uri = embedded_tracking_uri(demo_home)
    version = MlflowClient(uri, uri).get_model_version_by_alias("animl-classifier", "champion")
    logged = {a.path for a in MlflowClient(uri, uri).list_artifacts(version.run_id, "evaluation")}
    assert "evaluation/confusion_test.png" in logged and "evaluation/errors_test.png" in logged
    # ... and classifies the sample export with it into MegaDetector JSON that validates
    from animl_assets.core.detect.megadetector import validate_batch_output

    [merged] = (demo_home / "artifacts" / "classified_detections").rglob("classified_detections.json")
    merged = json.loads(merged.read_text())
    assert validate_batch_output(merged) == [] and merged["info"]["classifier"] == "animl-classifier v1"
    assert sum("classifications" in d for image in merged["images"] for d in image.get("detections") or []) > 0
    images = next(event for event in events if event.asset_key == dg.AssetKey("images"))
    assert [column.name for column in images.metadata["dagster/column_schema"].schema.columns][:3] == [
        "image_id", "file_name", "status"]




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


@browser
def test_the_asset_graph_shows_every_stage(ui, page, screenshots):
    base, _ = ui
    page.goto(f"{base}/asset-groups")
    for group in GROUPS:
        page.get_by_text(group, exact=True).first.wait_for()
    page.screenshot(path=screenshots / "1-asset-graph.png")
    assert page.title() == "Global asset lineage"


@browser
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


@browser
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


def test_animl_ui_serves_the_project_without_the_instance_warning_and_stops_on_sigterm(ui):
    """The last test of the module's one UI: it stops the UI."""
    _, home = ui
    [animl] = UI_PROCESS
    group = group_members(animl.pid)
    assert len(group) >= 3  # animl, dagster dev, its webserver and daemon
    animl.terminate()  # SIGTERM to animl alone, as a service manager sends it: dagster dev stops with it
    assert animl.wait(timeout=60) is not None
    deadline = time.monotonic() + 60
    while group_members(animl.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert group_members(animl.pid) == [], "dagster dev outlived animl ui"
    text = (home.parent / "dagster-dev.log").read_text()
    assert "will not be used" not in text, text
    assert (home / "dagster" / "dagster.yaml").resolve() == REPO / "dagster.yaml"
