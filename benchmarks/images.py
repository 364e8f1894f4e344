"""Throughput of the `images` stage core: fetch + full decode check + atomic write, local to local.

    python benchmarks/images.py [--images-dir DIR] [--count N]

Prints images/s and MB/s for 1 worker and for all cores, a re-run (nothing fetched), and peak RSS.
Default input: the real ENA24 JPEGs in ../shared/data/ena24_small, repeated to --count images.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from _shared_data import ENA24_DIR, require

from animl_assets.core.ingest.images import ImageRequest, collect_images
from animl_assets.resources.storage import LocalStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-dir", type=Path, default=ENA24_DIR)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    sources = sorted(require(args.images_dir).glob("*.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        source = LocalStore(Path(tmp) / "source")
        for i in range(args.count):
            source.write_bytes(f"img/{i:05d}.jpg", sources[i % len(sources)].read_bytes())
        total_mb = sum(f.size for f in source.list()) / 1e6
        requests = [ImageRequest(str(i), f"img/{i:05d}.jpg", f"img/{i:05d}.jpg") for i in range(args.count)]
        print(f"{args.count} images ({total_mb:.0f} MB) from {args.images_dir}, {os.cpu_count()} cores")
        for workers in sorted({1, os.cpu_count() or 1}):
            dest = LocalStore(Path(tmp) / f"dest{workers}")
            started = time.perf_counter()
            manifest = collect_images(requests, source, dest, workers=workers)
            seconds = time.perf_counter() - started
            assert (manifest["status"] == "good").all()
            print(f"  workers={workers}: {args.count / seconds:6.1f} images/s  {total_mb / seconds:6.1f} MB/s")
        earlier = {row["file_name"]: row for row in manifest.to_dict("records")}
        started = time.perf_counter()
        collect_images(requests, source, dest, workers=workers, already_good=earlier)
        print(f"  re-run (all verified): {args.count / (time.perf_counter() - started):8.0f} images/s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS: {peak:.0f} MB")


if __name__ == "__main__":
    main()
