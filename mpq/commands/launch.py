"""``mpq <stage> --nproc N``: the same job as ``torchrun --standalone --nproc_per_node N -m mpq <stage> ...``,
started with torch's elastic launcher (no restarts: a failed rank stops the job; re-running resumes)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from typing import Any


def _describe(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def root_cause(failures: dict[int, Any]) -> tuple[int, Any]:
    """The failure that most likely stopped the job: a rank killed by a signal other than SIGTERM (which the launcher
    sends to stop the rest), else one that stopped on an mpq error (exit code 2), else the earliest; the ranks
    whose collectives broke because of it, or that the launcher stopped, come after."""

    def key(item: tuple[int, Any]) -> tuple[int, float, int]:
        rank, f = item
        code = f.exitcode
        order = 0 if code < 0 and code != -signal.SIGTERM else 1 if code == 2 else 3 if code == -signal.SIGTERM else 2
        return (order, float(getattr(f, "timestamp", 0) or 0), rank)

    return min(failures.items(), key=key)


def launch_local(nproc: int, argv: list[str]) -> int:
    """Run ``python -m mpq *argv`` in ``nproc`` processes on this machine; 0 when every rank succeeds, else a
    one-line error naming the first rank that failed (the others are stopped by the launcher)."""
    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(
            max(1, (os.cpu_count() or 1) // nproc)
        )  # the cores shared out, as torchrun does
    logging.getLogger("torch.distributed.elastic").setLevel(
        logging.CRITICAL
    )  # its failure report is the line printed below
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"mpq-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.2,
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "mpq", *argv)
    except ChildFailedError as err:
        rank, failure = root_cause(err.failures)
        print(
            f"mpq: error: rank {rank} of {nproc} failed ({_describe(failure.exitcode)}, pid {failure.pid}); the other "
            "ranks were "
            "stopped; finished items are saved, re-run the same command to resume",
            file=sys.stderr,
        )
        return 2
    return 0
