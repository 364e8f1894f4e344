"""Runs the CLI starts in its own process: tagged with that process, so a later command can tell a run that
is still working from one whose process was killed (``kill -9``, out of memory) and left STARTED, holding
its pool slots (the daemon's run monitoring cannot see in-process runs)."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Callable, Iterable

import dagster as dg

PID_TAG, HOST_TAG = "animl/pid", "animl/host"
IN_PROGRESS = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def process_tags() -> dict[str, str]:
    """The tags that name the process a run executes in."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "\nState:\tZ" in status.read_text())  # a zombie is gone too


def process_gone(run: dg.DagsterRun) -> bool:
    """Whether ``run`` executed in a process of this machine that no longer exists."""
    pid, host = run.tags.get(PID_TAG), run.tags.get(HOST_TAG)
    return bool(pid and pid.isdigit() and host == socket.gethostname() and not _alive(int(pid)))


def end_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed every in-progress run whose process is gone, and free the pool slots of those runs and of
    runs that ended without freeing theirs; returns one line per run."""
    lines = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=IN_PROGRESS)):
        if process_gone(run):
            instance.report_run_failed(run, f"its process (pid {run.tags[PID_TAG]}) is gone: killed or crashed")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            lines.append(f"run {run.run_id[:8]} ({run.job_name}, pid {run.tags[PID_TAG]}) died without ending: "
                         "marked failed, its pool slots freed")
    for pool in sorted(instance.event_log_storage.get_concurrency_keys()):
        info = instance.event_log_storage.get_concurrency_info(pool)
        for run_id in sorted(info.active_run_ids | {step.run_id for step in info.pending_steps}):
            run = instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                instance.event_log_storage.free_concurrency_slots_for_run(run_id)
                lines.append(f"freed the {pool} pool slot that ended run {run_id[:8]} still held")
    return lines


def pool_holders(instance: dg.DagsterInstance, pool: str) -> list[str]:
    """Who holds ``pool``'s slots now: one description per run."""
    info = instance.event_log_storage.get_concurrency_info(pool)
    held = []
    for run_id in sorted(info.active_run_ids):
        run = instance.get_run_by_id(run_id)
        pid = f", pid {run.tags[PID_TAG]}" if run and PID_TAG in run.tags else ""
        held.append(f"run {run_id[:8]} ({run.job_name if run else 'unknown job'}{pid})")
    return held


def free_slots(instance: dg.DagsterInstance, pool: str) -> int | None:
    """How many of ``pool``'s slots are free now (None: the pool has no limit)."""
    info = instance.event_log_storage.get_concurrency_info(pool)
    limit = info.limit if info.limit is not None else info.slot_count or None
    return None if limit is None else limit - len(info.claimed_slots)


def wait_for_pools(instance: dg.DagsterInstance, pools: Iterable[str], say: Callable[[str], None],
                   poll_s: float = 2.0, report_every_s: float = 60.0) -> float:
    """Wait until each of ``pools`` has a free slot, saying what it waits for (and again every minute); runs
    that die meanwhile are ended. Ctrl-C or SIGTERM stops the wait (KeyboardInterrupt): waiting inside a
    Dagster run would hold those signals back until the step starts. Returns the seconds waited."""
    started, reported = time.monotonic(), -report_every_s
    handlers = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            for line in end_dead_runs(instance):
                say(line)
            busy = [pool for pool in pools if (free := free_slots(instance, pool)) is not None and free <= 0]
            if not busy:
                return time.monotonic() - started
            if time.monotonic() - reported >= report_every_s:
                reported = time.monotonic()
                say("; ".join(f"waiting for the {pool} pool, held by {', '.join(pool_holders(instance, pool))}"
                              for pool in busy) + f" ({reported - started:.0f} s so far; Ctrl-C stops)")
            time.sleep(poll_s)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def in_progress(instance: dg.DagsterInstance, run_id: str | None) -> bool:
    """Whether Dagster run ``run_id`` exists and has not ended (a dead process's run counts as ended)."""
    run = instance.get_run_by_id(run_id) if run_id else None
    return run is not None and run.status in IN_PROGRESS and not process_gone(run)
