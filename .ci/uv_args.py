"""Print the uv options that match this machine's pip configuration (its extra indexes, find-links and
constraints): uv does not read pip's configuration, and without them it would download what pip takes from
the local mirrors (PyTorch's CUDA build among them: several GB)."""

import os
import shlex
import subprocess
import sys


def pip_config() -> dict[str, str]:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    found = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        found[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    return found


def main() -> None:
    config = pip_config()
    options = ["--index-strategy", "unsafe-best-match"]  # the mirrors and PyPI are trusted alike, as for pip
    for url in (config.get("extra-index-url", "") or os.environ.get("PIP_EXTRA_INDEX_URL", "")).split():
        options += ["--extra-index-url", url]
    for place in (config.get("find-links", "") or os.environ.get("PIP_FIND_LINKS", "")).split():
        options += ["--find-links", place]
    for path in (config.get("constraint", "") or os.environ.get("PIP_CONSTRAINT", "")).split():
        if os.path.isfile(path):
            options += ["--constraint", path]
    print(shlex.join(options))


if __name__ == "__main__":
    main()
