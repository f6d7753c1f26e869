"""Resumable work over named items, sharded over the ranks of a torchrun job: sensitivity (items: layers) and
selection (items: candidate plans) both run through :class:`ShardedWork`.

* **Signature**: a hash of everything the numbers depend on; saved state with another signature is ignored.
* **Assignment**: items by estimated cost, longest first, to the least-loaded rank (:func:`distributed.assign`);
  an item is computed whole by one rank, with the batches one process would use, so no number depends on it.
* **Partial files**: each process keeps its own ``.<key>.partial[.rank<R>].json`` (atomic writes); a re-run with
  any number of ranks merges them, per item the state that got furthest (``progress``).
* **Done marker**: ``.<key>.done.json`` beside a finished artifact records the signature it was made with and the
  artifact's content hash, so a resumed stage does not compute it again, and an edited artifact is not trusted.
* **One sequence**: :func:`run_sharded` is the only place that strings these together (finished? read back; else
  share out, resume, compute this rank's items, save as it goes, collect, write, mark done); the stages give it
  their steps.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig

from mpq.errors import MpqError
from mpq.runner import distributed
from mpq.runner.files import file_digest, read_json, write_json
from mpq.runner.rundir import StageSpec

T = TypeVar("T")


def signature(**parts: Any) -> str:
    """A short hash of ``parts`` (JSON-serializable values)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_signature(spec: StageSpec, cfg: DictConfig, leave_out: Sequence[str] = (), **inputs: Any) -> str:
    """The signature of one of ``spec``'s artifacts: the stage's config values as its stamp records them (less
    ``leave_out``: variant keys the artifact records as it resolved them, in ``inputs``) and ``inputs`` (the input
    files' digests, the items, what else the numbers depend on)."""
    return signature(config=spec.values(cfg, leave_out), **inputs)


class ShardedWork:
    """The items of one artifact (``key``) in ``folder``: which are this rank's, their saved state, saving, merging."""

    @classmethod
    def of(cls, artifact: Path, sig: str, items: Sequence[str], **options: Any) -> ShardedWork:
        """The work behind ``artifact``: its partial files and done marker beside it, named by its stem."""
        return cls(artifact.parent, artifact.stem, sig, items, **options)

    def __init__(
        self,
        folder: Path,
        key: str,
        sig: str,
        items: Sequence[str],
        costs: Mapping[str, float] | None = None,
        progress: Callable[[Any], int] = lambda state: 1,
        save_every_s: float = 0.0,
        persist: bool = True,
    ) -> None:
        """``persist=False``: nothing is read from or written to ``folder`` (a look, not an artifact)."""
        self.folder, self.key, self.sig, self.items = folder, key, sig, list(items)
        self.persist = persist
        self.d = distributed.current()
        self.assign(costs)
        self.report: list[dict[str, float]] | None = None  # rank 0 of a sharded job, after collect: each rank's load
        self._progress = progress
        self._save_every_s = save_every_s
        self._last_save = time.monotonic()
        self.state: dict[str, Any] = {}  # this rank's items' state, as saved
        self._others: dict[str, Any] = {}  # other items' saved state (another rank count's work), carried along

    def assign(self, costs: Mapping[str, float] | None = None) -> None:
        """Share the items out by ``costs`` (default: equal)."""
        self.costs = dict(costs) if costs is not None else dict.fromkeys(self.items, 1.0)
        self.owner = distributed.assign(self.costs, self.d.world)
        self.mine = [i for i in self.items if self.owner[i] == self.d.rank]

    # ------------------------------------------------------------------ files
    @property
    def done_marker(self) -> Path:
        return self.folder / f".{self.key}.done.json"

    def _partial(self) -> Path:
        return self.folder / (
            f".{self.key}.partial.rank{self.d.rank}.json" if self.d.enabled else f".{self.key}.partial.json"
        )

    def _partial_files(self) -> list[Path]:
        return sorted(self.folder.glob(f".{self.key}.partial*.json"))

    def _made(self, artifact: Path) -> dict[str, str]:
        return {"signature": self.sig, "artifact": file_digest(artifact)}

    def finished(self, artifact: Path) -> bool:
        """Whether ``artifact`` is the one finished with this signature (its content unchanged since)."""
        if not (self.persist and artifact.is_file() and self.done_marker.is_file()):
            return False
        try:
            return read_json(self.done_marker) == self._made(artifact)
        except MpqError:
            return False

    def resume(self) -> dict[str, Any]:
        """The saved state of every item (all processes' partial files with this signature merged: per item, the state
        that got furthest); this rank keeps its own items' state to continue from."""
        best: dict[str, Any] = {}
        for f in self._partial_files() if self.persist else []:
            try:
                saved = read_json(f)
            except MpqError:
                continue  # a damaged partial file (writes are atomic, so only by hand): its items start over
            if (
                not isinstance(saved, dict)
                or saved.get("signature") != self.sig
                or not isinstance(saved.get("items"), dict)
            ):
                continue
            for item, state in saved["items"].items():
                if item in self.costs and (item not in best or self._progress(state) > self._progress(best[item])):
                    best[item] = state
        self.state = {i: s for i, s in best.items() if i in self.mine}
        self._others = {i: s for i, s in best.items() if i not in self.mine}  # kept on disk for a later rank count
        if self.persist and self.d.is_main:
            self.done_marker.unlink(missing_ok=True)  # being computed again: whatever was finished is not, until done
        return best

    def save(self, force: bool = False) -> None:
        """Write this rank's partial file (at most every ``save_every_s`` unless ``force``)."""
        if self.persist and (force or time.monotonic() - self._last_save >= self._save_every_s):
            write_json(self._partial(), {"signature": self.sig, "items": {**self._others, **self.state}})
            self._last_save = time.monotonic()

    # ------------------------------------------------------------------ ranks
    def collect(self, results: Mapping[str, Any], busy: float, unit: str, label: str) -> dict[str, Any]:
        """Every rank's ``results`` merged, on every rank (one process: ``results`` itself); rank 0 prints each rank's
        load as ``label: N <unit> over W ranks: ...``."""
        if not self.d.enabled:
            return dict(results)
        self.save(force=True)  # this rank's share is complete on disk before rank 0 merges
        merged, report = self.d.collect(results, busy, self.owner, self.costs)
        if report is not None:
            print(
                f"{label}: {len(self.items)} {unit} over {self.d.world} ranks: {distributed.load_line(report, unit)}",
                flush=True,
            )
            self.report = report
        return merged

    def finish(self, artifact: Path) -> None:
        """Rank 0: ``artifact`` is written; mark it done (signature + its content hash) and drop the partial files.
        Every rank waits for it."""
        if self.d.is_main and self.persist:
            write_json(self.done_marker, self._made(artifact))
            for f in self._partial_files():
                f.unlink(missing_ok=True)
        self.d.barrier()


def run_sharded(
    work: ShardedWork,
    artifact: Path,
    compute: Callable[[], Any],
    result: Callable[[Any], T],
    write: Callable[[T], None],
    read: Callable[[], T | None],
    *,
    force: bool = False,
    costs: Callable[[], Mapping[str, float]] | None = None,
    resumed: Callable[[dict[str, Any]], str | None] | None = None,
    label: str | None = None,
    unit: str = "items",
) -> T:
    """Make ``artifact`` by ``work``, or read it back: the one sequence of resumable, sharded work.

    1. ``artifact`` finished with this signature (and unchanged since): ``read()`` it back, unless ``force`` or it
       says ``None`` (not what is asked for: made again).
    2. Sharded: the items shared out by ``costs()`` (rank 0 estimates; every rank gets its share).
    3. The saved state resumed; ``resumed(saved)`` says what was already done (rank 0 prints it; None: nothing).
    4. ``compute()``: this rank's items ({item: result}), continuing ``work.state`` and calling ``work.save()`` as
       it goes.
    5. Every rank's results merged (``label``: the ranks' load line). ``label=None``: the work is not split by item
       (each rank computes the whole from sharded work of its own), and what ``compute()`` returns is taken as is.
    6. ``result(merged)`` on every rank is the value; rank 0 ``write``s it (unless ``work.persist`` is off), the
       artifact is marked done, the partial files dropped.
    """
    if not force and work.finished(artifact):
        done = read()
        if done is not None:
            return done
    if costs is not None and work.d.enabled:
        work.assign(work.d.broadcast(costs() if work.d.is_main else None))
    saved = work.resume()
    note = resumed(saved) if saved and resumed is not None else None
    if note and work.d.is_main:
        print(note, flush=True)
    t0 = time.perf_counter()
    mine = compute()
    busy = time.perf_counter() - t0
    merged = work.collect(mine, busy, unit, label) if label is not None else mine
    value = result(merged)
    if work.d.is_main and work.persist:
        write(value)
    work.finish(artifact)
    return value
