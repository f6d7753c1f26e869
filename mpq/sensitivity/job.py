"""One sensitivity file's work as one object: :class:`SensitivityJob` carries what every step of it needs (the config,
the run, kind, metric and method, the pipeline, the candidate bits, the layers, and whether to show progress, write
files and re-make finished ones), names the signatures of its files from the stage's one declaration
(:data:`mpq.runner.specs.SENSITIVITY`) and makes the resumable, sharded work behind each file. Also the pure helpers
every path shares: which layers a metric scores, values as the files hold them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mpq.errors import MpqError
from mpq.layers import assign_groups, content_patterns
from mpq.quant.model import PREFIX, QuantModel
from mpq.runner import distributed
from mpq.runner.files import file_digest
from mpq.runner.rundir import RunDir
from mpq.runner.sharded import ShardedWork, stage_signature
from mpq.runner.specs import SENSITIVITY
from mpq.search.mixdq_files import read_sensitivity
from mpq.sensitivity.scorers import SCORERS


@dataclass(frozen=True)
class SensitivityJob:
    """``sensitivity/<kind>_<metric>.yaml`` by ``method``: what its steps pass along."""

    cfg: DictConfig
    run: RunDir
    kind: str
    metric: str
    method: str  # the method this file is made by (the config's, or one asked for)
    pipe: Any
    qm: QuantModel
    bits: list[Any]  # the candidate bits (and weight formats), the columns of the file
    names: list[str]  # the layers it covers
    show: bool = True  # progress bars
    write: bool = True  # False: nothing read from or written to the run (a look, a benchmark)
    force: bool = False  # make it again even when finished with these settings

    @property
    def out(self) -> Path:
        return self.run.sensitivity_file(self.kind, self.metric)

    @property
    def label(self) -> str:
        return f"[sensitivity] {self.kind} {self.metric}"

    def say(self, text: str) -> None:
        """``[sensitivity] <kind> <metric>: text``, printed by rank 0."""
        if distributed.current().is_main:
            print(f"{self.label}: {text}", flush=True)

    def signature(self, names: list[str], metric: str | None = None, **how: Any) -> str:
        """What one of its files' numbers depend on: the stage's config values (the variant keys left out: ``how``
        says what this file's computation used of them), the checkpoint's content, the bits, the layers, and the
        metric (``metric``: another name, for a file that serves both metrics)."""
        return stage_signature(
            SENSITIVITY,
            self.cfg,
            SENSITIVITY.variants,
            kind=self.kind,
            metric=metric or self.metric,
            bits=self.bits,
            ckpt=file_digest(self.run.ckpt),
            layers=names,
            how=how,
        )

    def work(self, artifact: Path, sig: str, names: list[str]) -> ShardedWork:
        """The resumable work behind ``artifact``: its layers' states (batches done, sums) saved as it goes."""
        return ShardedWork.of(
            artifact,
            sig,
            names,
            progress=lambda s: len(s["batches"]),
            save_every_s=self.cfg.sensitivity.save_every_s,
            persist=self.write,
        )

    def read_finished(self) -> dict[str, list[float]]:
        """The file finished with these settings, read back (and said so)."""
        self.say(f"already made with these settings ({self.out})")
        return read_sensitivity(self.out, self.bits)


def layers_to_score(names: list[str], cfg: DictConfig, metric: str, family: str) -> list[str]:
    """The layers ``metric`` scores (SQNR: all; SSIM: the content group) among ``names``, restricted to
    ``sensitivity.layers`` when set, in module order."""
    group = SCORERS[metric].group
    patterns_content = content_patterns(cfg, family)
    groups = assign_groups(names, patterns_content, warn=False)
    chosen = [n for n in names if group is None or groups[n] == group]
    patterns = list(cfg.sensitivity.layers)
    if patterns:
        chosen = [n for n in chosen if any(fnmatchcase(n, p) or fnmatchcase(n[len(PREFIX) :], p) for p in patterns)]
        if not chosen and group is None:
            raise MpqError(
                f"sensitivity.layers={patterns} matches no layer; see `mpq layers --config ...` for the names"
            )
    elif not chosen:
        raise MpqError(
            f"no layer is in the content group (groups.content={patterns_content}); the SSIM file would be empty: "
            "fix groups.content (see `mpq layers --config ...`)"
        )
    return chosen


def read_back(values: list[float], digits: int = 6) -> list[float]:
    """Values as the sensitivity files hold them (6 decimals): a result used at once equals one read back."""
    return [round(v, digits) if math.isfinite(v) else v for v in values]
