"""Scale-out with torch.distributed: one process per device, launched by ``torchrun`` (or ``mpq ... --nproc N``).

Work items (a layer's sensitivity, a candidate plan's images) are independent; each is computed whole by one
rank, with the batches it would use in a single process, so no number depends on the sharding. Items are
assigned by estimated cost (longest first, to the least-loaded rank: deterministic); every rank keeps its own
partial file; rank 0 merges and writes the same artifacts as one process. The engine is torch.distributed's:
a process group (gloo: the collectives carry small objects only), object collectives, barriers; ``torchrun``'s
elastic agent stops every rank when one dies.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T", bound=Hashable)
# waits on rank 0 (calibration, PTQ, search run there alone) can be long; a dead rank is the agent's to catch
WAIT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def collect(
        self, results: Mapping[Any, Any], busy: float, owner: Mapping[Any, int], costs: Mapping[Any, float]
    ) -> tuple[dict[Any, Any], list[dict[str, float]] | None]:
        """Every rank's ``results`` merged, on every rank; on rank 0 also each rank's load (:func:`idle_report`) from
        the seconds each was ``busy`` and the items ``owner`` gave it, weighed by ``costs``."""
        merged: dict[Any, Any] = {}
        for part in self.gather(dict(results)):
            merged.update(part)
        times = self.gather(busy)
        if not self.is_main:
            return merged, None
        counts, shares = [0] * self.world, [0.0] * self.world
        for item, r in owner.items():
            counts[r] += 1
            shares[r] += float(costs[item])
        return merged, idle_report(times, counts, shares)

    def tag(self) -> str:
        return f"[rank {self.rank}/{self.world}] " if self.enabled else ""


def current() -> Dist:
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()


def launched() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> Dist:
    """Join the torchrun job (from its environment). Each rank computes on ``cuda:LOCAL_RANK`` when GPUs are
    visible (several ranks may share one GPU), else on the CPU. The collectives carry only small Python objects
    (assignments, finished scores), so the process group is gloo in both cases: NCCL would refuse two ranks on
    one GPU and adds nothing here."""
    if not launched():
        return Dist()
    _die_with_parent()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group("gloo", timeout=WAIT)
    return current()


def _die_with_parent() -> None:
    """A rank ends when the process that launched it does (Linux ``PR_SET_PDEATHSIG``): a launcher killed by the
    system (out of memory) leaves no orphaned ranks behind."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except OSError:
            pass


def device_override(d: Dist) -> list[str]:
    """Config overrides that put this rank on its own GPU (none on CPU)."""
    if d.enabled and torch.cuda.is_available():
        return [f"model.device=cuda:{d.local_rank % torch.cuda.device_count()}"]
    return []


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a group broken by a dead rank: the process is ending anyway
            pass


def assign(costs: Mapping[T, float], world: int) -> dict[T, int]:
    """Longest-processing-time-first: items by cost (desc; equal costs in their order), each to the least-loaded
    rank (ties: the lowest rank). Deterministic; within ~4/3 of the best makespan."""
    load = [0.0] * world
    out: dict[T, int] = {}
    for item in sorted(costs, key=lambda it: -costs[it]):
        r = min(range(world), key=lambda j: (load[j], j))
        out[item] = r
        load[r] += float(costs[item])
    return out


def idle_report(busy: Sequence[float], items: Sequence[int], est: Sequence[float]) -> list[dict[str, float]]:
    """Per rank: busy seconds, idle fraction (waiting for the slowest rank), items, estimated cost share."""
    longest = max(busy) if busy else 0.0
    total_est = sum(est) or 1.0
    return [
        {
            "rank": r,
            "busy_s": round(b, 3),
            "idle_fraction": round(1 - b / longest, 4) if longest > 0 else 0.0,
            "items": int(items[r]),
            "estimated_share": round(est[r] / total_est, 4),
        }
        for r, b in enumerate(busy)
    ]


def load_line(report: Sequence[Mapping[str, float]], unit: str) -> str:
    """'rank 0 61 layers 10.8 s (idle 5%), ...' of an :func:`idle_report`."""
    return ", ".join(
        f"rank {r['rank']} {r['items']} {unit} {r['busy_s']:.1f} s (idle {r['idle_fraction']:.0%})" for r in report
    )
