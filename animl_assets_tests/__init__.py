"""The test suite. It runs on two xdist workers on a two-core machine: one compute thread per process (the
workers and every process they start inherit this) instead of each PyTorch thread pool spinning on all cores."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
