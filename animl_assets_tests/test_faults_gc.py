"""The CLI under faults, continued (a file of its own, so that the suite's two workers share the slow CLI
trainings): `animl gc` while a training reads what it would remove."""

import dagster as dg
import pytest

from animl_assets_tests.test_faults import _animl, _training_past_its_first_epoch, cli_home

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(tmp_path_factory, built_dataset_home):
    return cli_home(tmp_path_factory, built_dataset_home)


def _newest_version(dagster_home, asset: str) -> str:
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        return instance.get_latest_materialization_event(dg.AssetKey(asset)).asset_materialization.metadata[
            "version"].value


def test_gc_during_a_training_keeps_what_the_training_reads(home):
    settings, dagster_home, root, env = home
    for name, excluded in (("d2", "turkey"), ("d3", "raccoon")):
        (root / f"{name}.yaml").write_text(f"ops: {{classification_dataset: {{config: {{excluded_classes: "
                                           f"[empty, {excluded}]}}}}}}")
    assert _animl(env, "build-dataset", "--run-config", str(root / "d2.yaml"))[0].returncode == 0
    read = {asset: _newest_version(dagster_home, asset) for asset in ("classification_dataset", "splits")}
    log = root / "gc-training.log"
    training = _training_past_its_first_epoch(env, root, log)
    # meanwhile a newer dataset, then gc keeping only the newest version of each asset
    assert _animl(env, "build-dataset", "--run-config", str(root / "d3.yaml"))[0].returncode == 0
    gc, _ = _animl(env, "gc", "--keep", "1", "--yes")
    assert gc.returncode == 0, gc.stderr
    assert training.wait(timeout=600) == 0, log.read_text()
    for asset, version in read.items():
        assert version not in gc.stdout and (settings.home / "artifacts" / asset / version).is_dir()
    assert "materialized registered_model" in log.read_text()  # the evaluation found its dataset and splits
    later, _ = _animl(env, "gc", "--keep", "1")  # once it is over, nothing holds them but their model
    assert later.returncode == 0
