"""The per-export ingest at scale: an export of N images that are all missing, through the Definitions.

    python benchmarks/ingest_scale.py [--images 500000]

Writes a synthetic COCO Camera Traps export (no image files), registers it in a temporary ANIML_HOME and
materializes the ingest job (cct_export, images, md_detections, crops) in process. Prints seconds per
step, the number of event-log entries and the size of the instance's databases, and peak RSS: a failed
image must cost a manifest row, not an event-log line.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import dagster as dg

from animl_assets.definitions import INGEST_JOB, build_definitions
from animl_assets.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env({"ANIML_HOME": tmp})
        exports = Path(settings.exports_uri)
        exports.mkdir(parents=True)
        export = {"images": [{"id": i, "file_name": f"cam{i % 100:02d}/{i:07d}.jpg", "location": f"site{i % 100}"}
                             for i in range(args.images)],
                  "annotations": [], "categories": [{"id": 0, "name": "empty"}]}
        (exports / "big.json").write_text(json.dumps(export))
        print(f"export: {args.images} images (all missing), {(exports / 'big.json').stat().st_size / 1e6:.0f} MB")
        dagster_home = Path(tmp) / "dagster"
        dagster_home.mkdir()
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            instance.add_dynamic_partitions("exports", ["big"])
            started = time.perf_counter()
            result = build_definitions(settings).resolve_job_def(INGEST_JOB).execute_in_process(
                partition_key="big", instance=instance, raise_on_error=False,
                run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}})
            total = time.perf_counter() - started
            logs = instance.all_logs(result.run_id)
            warnings = sum(entry.level >= 30 for entry in logs)
            starts = {e.step_key: e.timestamp for e in logs if e.dagster_event_type == dg.DagsterEventType.STEP_START}
            for entry in logs:
                if entry.dagster_event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
                    print(f"  {entry.step_key:<14} {entry.dagster_event_type.value.lower():<13} "
                          f"{entry.timestamp - starts[entry.step_key]:7.1f} s")
        db_mb = sum(p.stat().st_size for p in dagster_home.rglob("*.db")) / 1e6
        print(f"run {'succeeded' if result.success else 'FAILED'} in {total:.1f} s; event log: {len(logs)} entries "
              f"({warnings} warnings), instance databases {db_mb:.1f} MB; peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
