"""The run directory: every stage reads and writes files here.

A stage leaves a stamp (``.stamps/<stage>.json``) holding the values of the
config keys it depends on (its :class:`StageSpec`, less the bookkeeping keys)
and hashes of its upstream stamps. It is up to date when its stamp matches and
all its outputs exist; then it is skipped. Deleting an artifact, or changing a
config key it reads, re-runs that stage and, through the stamp chain,
everything downstream. Every path of a run is spelled here, and only here.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mpq.errors import MpqError
from mpq.runner.config import config_from_yaml_text, load_config, settings, to_yaml
from mpq.runner.files import file_digest, formats_twin, write_json, write_text


@dataclass(frozen=True)
class StageSpec:
    """One stage's declaration: the config keys its outputs depend on, the stages it reads, and its outputs. The
    stamp (:meth:`RunDir.stage_state`), the stage's signatures and its done markers (:mod:`mpq.runner.sharded`) all
    read the keys from here, through :meth:`values`; the declarations themselves are :mod:`mpq.runner.specs`."""

    name: str
    config_keys: tuple[str, ...]  # dotted config keys (a section: all of it) whose values the stage's outputs depend on
    upstream: tuple[str, ...]  # stages whose outputs it reads
    outputs: Callable[[RunDir], tuple[Path, ...]]  # its files and folders, as the run directory names them
    # keys within ``config_keys`` that change no number (how often progress is saved, memory chunking): in no stamp
    # and no signature
    bookkeeping: tuple[str, ...] = ()
    # keys within ``config_keys`` that choose how each output is computed (sensitivity.method, ...): the stamp holds
    # them as set, so changing one re-runs the stage; each output's signature holds what its computation used instead
    # (an exact file does not depend on the estimator), so the stage re-makes only the outputs they change
    variants: tuple[str, ...] = ()

    def values(self, cfg: DictConfig, leave_out: Sequence[str] = ()) -> dict[str, Any]:
        """{key: resolved value} of ``config_keys`` as stamps and signatures record them: the bookkeeping keys, and
        ``leave_out``, dropped (a dropped key inside a section is dropped from the section's value)."""
        dropped = (*self.bookkeeping, *leave_out)
        out: dict[str, Any] = {}
        for key in self.config_keys:
            if key in dropped:
                continue
            value = settings(cfg, key)
            for d in dropped:
                if d.startswith(key + "."):
                    _drop(value, d[len(key) + 1 :].split("."))
            out[key] = value
        return out


def _drop(value: Any, path: list[str]) -> None:
    """Remove the nested key ``path`` from a dict of dicts (nothing when absent)."""
    for part in path[:-1]:
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, dict):
        value.pop(path[-1], None)


def refined_prefix(kind: str) -> str:
    """How the names of selection's refined plans begin (``weight_refined_4.00_inf.yaml``)."""
    return f"{kind}_refined_"


def is_refined(kind: str, plan_file: str) -> bool:
    """Is ``plan_file`` selection's refined plan (in ``selection/``), not one of the search's family?"""
    return plan_file.startswith(refined_prefix(kind))


class RunDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise MpqError(f"the run directory {self.root} is a file; give a folder (--outdir / --base_path)")

    # ------------------------------------------------------------------ paths (the only place that spells them)
    def __truediv__(self, rel: str) -> Path:
        return self.root / rel

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    # calib: the FP run
    @property
    def calib(self) -> Path:
        return self.root / "calib"

    @property
    def calib_meta(self) -> Path:
        return self.calib / "meta.json"

    def calib_step(self, k: int) -> Path:
        """The recorded denoiser inputs and outputs of step ``k``."""
        return self.calib / f"step_{k:03d}.safetensors"

    @property
    def fp_images(self) -> Path:
        return self.root / "fp_images"

    def fp_image(self, image: int | str) -> Path:
        """FP image number ``image``, or the FP image named like a generated one (``0003.png``)."""
        return self.fp_images / (image if isinstance(image, str) else f"{image:04d}.png")

    # ptq
    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt.safetensors"

    # sensitivity
    @property
    def sensitivity(self) -> Path:
        return self.root / "sensitivity"

    def sensitivity_file(self, kind: str, metric: str) -> Path:
        return self.sensitivity / f"{kind}_{metric}.yaml"

    @property
    def float_floor(self) -> Path:
        return self.sensitivity / "float_floor.json"

    @property
    def sensitivity_load(self) -> Path:
        """Each file's load per rank, of the sharded runs that made them."""
        return self.sensitivity / "distributed.json"

    def estimate_file(self, kind: str, estimator: str) -> Path:
        """An estimator's numbers for every layer (the SQNR and the SSIM file of ``kind`` read the same)."""
        return self.sensitivity / "estimate" / f"{kind}.{estimator}.yaml"

    def exact_subset_file(self, kind: str, metric: str) -> Path:
        """Hybrid: the exact metric of the layers it recomputed."""
        return self.sensitivity / "estimate" / f"{kind}_{metric}.exact.yaml"

    def hybrid_report(self, kind: str, metric: str) -> Path:
        """Hybrid: which layers were recomputed exactly, and the offsets onto the exact scale."""
        return self.sensitivity / f"hybrid_{kind}_{metric}.json"

    # search
    @property
    def candidates(self) -> Path:
        return self.root / "candidates"

    @property
    def candidate_table(self) -> Path:
        return self.candidates / "pareto.csv"

    def candidate_folder(self, kind: str) -> Path:
        """The sweep's plan files of ``kind`` (exactly the table's)."""
        return self.candidates / kind

    def candidate_plan(self, kind: str, plan_file: str) -> Path:
        return self.candidate_folder(kind) / plan_file

    def scored_plan(self, kind: str, plan_file: str) -> Path:
        """The plan file of a row of ``selection/<kind>_scores.csv``: a candidate of the search, or selection's own
        refined plan (``<kind>_refined_*``, in ``selection/``)."""
        return self.selection / plan_file if is_refined(kind, plan_file) else self.candidate_plan(kind, plan_file)

    @property
    def manual_plans(self) -> Path:
        """Plans of single solves (``mpq search --K/--budget_mb``), beside the sweep's."""
        return self.candidates / "manual"

    @property
    def act_protect(self) -> Path:
        """The search's act-protect list (MixDQ: ``act_protect.pt``; a ``.txt`` copy beside it)."""
        return self.candidates / "act_protect.pt"

    # select
    @property
    def selection(self) -> Path:
        return self.root / "selection"

    def scores(self, kind: str) -> Path:
        return self.selection / f"{kind}_scores.csv"

    def budgets(self, kind: str) -> Path:
        """The best scored plan at each named budget."""
        return self.selection / f"{kind}_budgets.csv"

    def refine_log(self, kind: str) -> Path:
        """The refinement of the chosen plan: its start, every accepted move, its result (JSON)."""
        return self.selection / f"{kind}_refine.json"

    def curve(self, kind: str) -> Path:
        """What each budget costs: the best scored plan at no more bytes, where it improves."""
        return self.selection / f"{kind}_curve.csv"

    def selection_images(self, kind: str, plan_file: str) -> Path:
        """The images a candidate plan generated for selection."""
        return self.selection / "images" / kind / Path(plan_file).stem

    @property
    def final_weight(self) -> Path:
        return self.selection / "final_weight.yaml"

    @property
    def final_act(self) -> Path:
        return self.selection / "final_act.yaml"

    @property
    def final_protect(self) -> Path:
        return self.selection / "final_act_protect.pt"

    # final
    @property
    def generated_images(self) -> Path:
        return self.root / "generated_images"

    @property
    def infer_images(self) -> Path:
        """``mpq infer``'s default image folder (never a stage's output)."""
        return self.root / "infer_images"

    @property
    def trace(self) -> Path:
        """``mpq trace``'s default folder (never a stage's output; the report shows it)."""
        return self.root / "trace"

    # report
    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def report_page(self) -> Path:
        return self.report / "index.html"

    @property
    def summary(self) -> Path:
        return self.report / "summary.json"

    @property
    def report_images(self) -> Path:
        """The evaluation images, one folder a plan (and FP's)."""
        return self.report / "images"

    def sensitivity_plot(self, kind: str, metric: str) -> Path:
        return self.report / f"sensitivity_{kind}_{metric}.png"

    @property
    def pareto_plot(self) -> Path:
        return self.report / "pareto.png"

    @property
    def selection_plot(self) -> Path:
        return self.report / "selection.png"

    @property
    def peers_plot(self) -> Path:
        return self.report / "peers.png"

    def report_copy(self, source: Path) -> Path:
        """Where the report page keeps a copy of a file it shows from elsewhere (a trace's plots): its name."""
        return self.report / source.name

    @property
    def stamps(self) -> Path:
        return self.root / ".stamps"

    def require(self, path: str | Path, how: str) -> Path:
        """``path`` (absolute, or relative to the run directory) if it exists, else a one-line error saying ``how``
        to make it. A relative ``path`` already under a relative run directory (``run.ckpt`` of ``outputs/x``) is
        not joined twice."""
        path = Path(path)
        if not path.is_absolute() and path.parts[: len(self.root.parts)] != self.root.parts:
            path = self.root / path
        if not path.exists():
            raise MpqError(f"{path} is missing; {how}")
        return path

    # ------------------------------------------------------------------ config
    def save_config(self, cfg: DictConfig) -> None:
        write_text(self.config_path, to_yaml(cfg))

    def load_config(self, config: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
        """``config`` (name or path) if given, else the run's own ``config.yaml``."""
        if config:
            return load_config(config, list(overrides))
        if not self.config_path.is_file():
            raise MpqError(
                f"{self.root} is not an mpq run directory (no config.yaml); give --config, or run `mpq calib` first"
            )
        return config_from_yaml_text(self.config_path.read_text(), str(self.config_path), overrides)

    # ------------------------------------------------------------------ stamps
    def _stamp_path(self, stage: str) -> Path:
        return self.stamps / f"{stage}.json"

    def _expected(self, stage: StageSpec, cfg: DictConfig) -> dict[str, object]:
        values = stage.values(cfg)
        upstream = {}
        for up in stage.upstream:
            p = self._stamp_path(up)
            upstream[up] = hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else None
        return {"config": values, "upstream": upstream}

    def output_files(self, stage: StageSpec) -> list[Path]:
        """The stage's output files: each output file, or every file under an output folder (hidden ones excepted)."""
        files: list[Path] = []
        for path in stage.outputs(self):
            found = (
                sorted(f for f in path.rglob("*") if f.is_file())
                if path.is_dir()
                else [f for f in dict.fromkeys((path, formats_twin(path))) if f.is_file()]
            )
            files += [f for f in found if not f.name.startswith(".")]  # temp and partial files are not outputs
        return files

    def output_digests(self, stage: StageSpec, known: dict[str, Any] | None = None) -> dict[str, list[Any]]:
        """{file: [content hash, size, mtime_ns]} of the stage's outputs. A file whose size and time equal ``known``'s
        record keeps its recorded hash (not read again); any other is hashed: a copy, whose times differ, is
        compared by content."""
        known = known or {}
        out: dict[str, list[Any]] = {}
        for f in self.output_files(stage):
            rel, st = str(f.relative_to(self.root)), f.stat()
            rec = known.get(rel)
            same = isinstance(rec, list) and len(rec) == 3 and rec[1:] == [st.st_size, st.st_mtime_ns]
            out[rel] = [rec[0] if same else file_digest(f), st.st_size, st.st_mtime_ns]
        return out

    def stage_state(self, stage: StageSpec, cfg: DictConfig) -> str:
        """``fresh``; ``missing`` (never made, or an output it made is gone); ``unstamped`` (its outputs are there but
        no stage of this run made them: put there by hand); ``stale`` (its config keys or an upstream stage changed
        since, or the stamp is from an older mpq); ``changed`` (an output's content differs from what it wrote)."""
        p = self._stamp_path(stage.name)
        if not all(o.exists() or formats_twin(o).is_file() for o in stage.outputs(self)):
            return "missing"
        if not p.is_file():
            return "unstamped"
        try:
            stamp = json.loads(p.read_text())
        except json.JSONDecodeError:
            return "missing"
        recorded = stamp.get("outputs") if isinstance(stamp, dict) else None
        if not isinstance(recorded, dict) or not all(isinstance(v, list) and len(v) == 3 for v in recorded.values()):
            return "stale"  # written before stamps recorded their outputs this way
        if any(not (self.root / rel).is_file() for rel in recorded):
            return "missing"
        expected = self._expected(stage, cfg)
        if stamp.get("config") != expected["config"] or stamp.get("upstream") != expected["upstream"]:
            return "stale"
        now = self.output_digests(stage, recorded)
        return "fresh" if {k: v[0] for k, v in now.items()} == {k: v[0] for k, v in recorded.items()} else "changed"

    def is_fresh(self, stage: StageSpec, cfg: DictConfig) -> bool:
        return self.stage_state(stage, cfg) == "fresh"

    def mark_done(self, stage: StageSpec, cfg: DictConfig, seconds: float) -> None:
        stamp = self._expected(stage, cfg)
        stamp["outputs"] = self.output_digests(stage)
        stamp.update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 3)})
        write_json(self._stamp_path(stage.name), stamp)

    # ------------------------------------------------------------------ one job at a time
    @contextmanager
    def lock(self, what: str, write: bool = True) -> Iterator[None]:
        """Hold the run directory for this job. The lock is an OS file lock (``flock``), so a killed job's lock
        is gone with its process and never blocks a resume; a second job gets a one-line error naming the holder.
        The ranks of one torchrun job are one holder: rank 0 takes the lock for all of them. A job that only reads
        the run (``write=False``: export) runs without the lock where the directory cannot be written."""
        import fcntl
        import os
        import socket

        from mpq.runner import distributed

        d = distributed.current()
        if not d.is_main:
            yield
            return
        if d.enabled:
            what = f"{what} ({d.world} ranks)"

        path = self.root / ".lock"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            f = open(path, "a+")  # noqa: SIM115 - held for the duration of the job
        except OSError as err:
            if write or not self.root.is_dir():
                raise MpqError(
                    f"{self.root} cannot be written ({err.strerror or type(err).__name__}: {path}); "
                    "give a run directory you can write to, or fix its permissions"
                ) from None
            yield  # read-only: nothing here is written, so nothing to guard
            return
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                try:
                    holder = json.loads(f.read() or "{}")
                except json.JSONDecodeError:
                    holder = {}
                raise MpqError(
                    f"{self.root} is in use by another mpq job (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}, "
                    f"{holder.get('what', '?')}, since {holder.get('since', '?')}); wait for it to finish or stop it"
                ) from None
            f.seek(0)
            f.truncate()
            f.write(
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "host": socket.gethostname(),
                        "what": what,
                        "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    }
                )
            )
            f.flush()
            yield
        finally:
            f.close()  # closing releases the lock
