"""Runs from a clone without ../shared say what is missing instead of failing obscurely."""

import subprocess
import sys
from pathlib import Path

import pytest

from animl_assets_tests.conftest import shared_data

REPO = Path(__file__).resolve().parents[1]


def test_tests_that_need_shared_data_say_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"needs the ENA24 sample images at {tmp_path}"):
        shared_data(tmp_path)
    monkeypatch.setenv("CI", "true")  # in CI the data must be there: a failure, not a silent skip
    with pytest.raises(pytest.fail.Exception, match="../shared/data/ena24_small"):
        shared_data(tmp_path)


@pytest.mark.parametrize("script", ["images.py", "crops.py"])
def test_benchmarks_say_what_input_is_missing(tmp_path, script):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--images-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "benchmark input missing: no" in run.stderr and str(tmp_path) in run.stderr
    assert "--images-dir" in run.stderr
