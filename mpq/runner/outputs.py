"""Where a command may write: one decision for every command that writes a folder of its own (``generate`` and
``infer`` images, ``export``, ``trace`` and its ``--dump``, ``train-tiny``); each kind of output is declared beside
the code that writes it (:data:`mpq.images.IMAGES`, :data:`mpq.trace.files.TRACE`, :data:`mpq.trace.dump.DUMP`,
:data:`mpq.shapes.train.TRAINING`, :func:`mpq.export.folder.export_kind`).

A command's output folder may be new, empty, or an earlier output of the same kind holding nothing but the files that
kind writes; a folder holding anything else (a user's ``NOTES.txt``, another tool's images) is refused with the
files named, never overwritten or deleted. A run directory's own folders belong to its stages: an output folder may
not be a run directory, contain one, or lie inside one (symlinks resolved), except the folder the command itself
keeps in its own run (``RUN/infer_images``, ``RUN/trace``). All of this is decided before any model is loaded.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mpq.errors import MpqError
from mpq.runner.rundir import RunDir


@dataclass(frozen=True)
class OutputKind:
    """What a command writes into its folder: ``patterns`` match the relative paths (``/``-separated) of every file
    it may leave there; ``owns`` says whether a non-empty folder is an earlier output of this kind."""

    name: str
    patterns: tuple[str, ...]
    owns: Callable[[Path], bool]

    def foreign(self, folder: Path, limit: int = 4) -> list[str]:
        """Files in ``folder`` this kind does not write (relative paths, the first ``limit`` found in sorted walk
        order); a run directory inside it is a one-line error."""
        out: list[str] = []
        for root, dirs, files in os.walk(folder):
            here = Path(root)
            if here != folder and is_run_dir(here):
                raise MpqError(f"{folder} contains the run directory {here}; give a folder outside it")
            dirs.sort()
            for name in sorted(files):
                rel = (here / name).relative_to(folder).as_posix()
                if not any(fnmatch.fnmatchcase(rel, pat) for pat in self.patterns):
                    out.append(rel)
                    if len(out) >= limit:
                        return out
        return out


def json_field(path: Path, key: str) -> object:
    """``key`` of the JSON object in ``path``; None when the file is missing, unreadable or not an object (for an
    :class:`OutputKind`'s ``owns``)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` is an mpq run directory (its stamps, or a saved config beside recorded calibration)."""
    run = RunDir(folder)
    return run.stamps.is_dir() or (run.config_path.is_file() and run.calib.is_dir())


def enclosing_run(path: Path) -> Path | None:
    """The run directory ``path`` is, or lies inside (symlinks resolved), if any."""
    for p in (path, *path.parents):
        if p.is_dir() and is_run_dir(p):
            return p
    return None


def check_output_folder(
    path: str | Path,
    option: str,
    kind: OutputKind,
    run_root: Path | None = None,
    own_folder: Path | None = None,
    overwrite: bool = False,
    hint: str = "",
) -> Path:
    """The absolute folder ``path`` if ``option`` may write a ``kind`` output there, else a one-line error saying
    why and what to give instead (see the module). ``run_root``: the run the command reads; ``own_folder``: the
    folder it keeps inside that run (allowed there); ``overwrite``: a folder holding other files may be replaced
    too, its old content set aside (:func:`set_aside`), never deleted; ``hint`` ends a refusal of a non-empty folder."""
    given = Path(path)
    if given.is_symlink() or (given.exists() and not given.is_dir()):
        raise MpqError(f"{option} {given} is a file or a link, not a folder; give a new folder")
    target = given.resolve()
    own = own_folder.resolve() if own_folder is not None else None
    runs = {r.resolve() for r in (run_root,) if r is not None}
    inside = enclosing_run(target if target.exists() else _existing_parent(target))
    if inside is not None:
        runs.add(inside.resolve())
    for run in runs:
        if target == own:
            continue
        if target == run or run.is_relative_to(target):
            raise MpqError(f"{option} {given} is or contains the run directory {run}; give a folder outside it")
        if target.is_relative_to(run):
            where = f"; mpq keeps this command's output in {own}" if own is not None else ""
            raise MpqError(f"{option} {given} lies inside the run directory {run}; give a folder outside it{where}")
    if not target.is_dir() or not any(target.iterdir()) or overwrite:
        return target
    foreign = kind.foreign(target)
    if foreign:
        shown = ", ".join(foreign[:3]) + (" and more" if len(foreign) > 3 else "")
        raise MpqError(
            f"{option} {given} holds files mpq did not write there ({shown}); move them out or give a new folder{hint}"
        )
    if not kind.owns(target):
        raise MpqError(
            f"{option} {given} is not empty and not an earlier {kind.name}; give a new or empty folder{hint}"
        )
    return target


def is_replaceable(folder: Path, kind: OutputKind) -> bool:
    """Whether ``folder`` may be deleted to make way for a new ``kind`` output: missing, empty, or an earlier output
    of that kind holding only its own files."""
    return not folder.is_dir() or not any(folder.iterdir()) or (kind.owns(folder) and not kind.foreign(folder))


def set_aside(folder: Path) -> Path:
    """Move ``folder`` to a new sibling ``<name>.replaced-<n>`` (kept, for the user to look at) and return it."""
    n = 1
    while (aside := folder.with_name(f"{folder.name}.replaced-{n}")).exists():
        n += 1
    folder.rename(aside)
    return aside


def _existing_parent(path: Path) -> Path:
    return next((p for p in path.parents if p.exists()), Path(path.anchor or "."))
