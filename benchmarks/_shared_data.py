"""Where the benchmarks find the real ENA24 camera-trap images, and a clear stop when they are absent."""

from __future__ import annotations

from pathlib import Path

ENA24_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ena24_small"


def require(folder: Path, *names: str) -> Path:
    """``folder`` if it holds JPEGs and every file in ``names``; otherwise stop with what is missing."""
    missing = [name for name in names if not (folder / name).is_file()]
    if not folder.is_dir() or not any(folder.glob("*.jpg")) or missing:
        what = f"{', '.join(missing)} and JPEGs" if missing else "JPEGs"
        raise SystemExit(
            f"benchmark input missing: no {what} in {folder}. The default is the ENA24 sample in "
            f"../shared/data/ena24_small beside the repository (present in CI and the project's workspace, "
            f"not in a plain clone); pass --images-dir DIR with images of your own.")
    return folder
