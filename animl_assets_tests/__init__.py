"""The test suite. It runs on two xdist workers on a two-core machine: one compute thread per process (the
workers and every process they start inherit this), instead of each PyTorch thread pool spinning on both
cores beside the other worker's (two trainings side by side took 67 s each with the default threads, 21 s
with one)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
