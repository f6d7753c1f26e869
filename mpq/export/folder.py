"""The output folder of ``mpq export``: checked before anything is written, filled in a temp folder, renamed into place.

An export never deletes what it did not make: ``--out`` may be a new folder, an empty one, or an earlier export of
the same format (its ``mpq_export.json`` says so) holding only the files an export writes; anything else needs
``--overwrite``, which sets the old folder aside (``<out>.replaced-<n>``) instead of deleting it. A regular file, a
run directory, a folder that contains one, or a folder inside one never qualifies (:mod:`mpq.runner.outputs`).
Leftovers of a killed export (the hidden temp and old folders beside ``--out``, recognised by their marker) are
removed by the next export.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mpq.errors import MpqError
from mpq.runner.files import current_umask
from mpq.runner.outputs import OutputKind, check_output_folder, is_replaceable, set_aside

MARKER = "mpq_export.json"


def export_format(folder: Path) -> str | None:
    """The format of an mpq export folder (its marker; an older ``mpq`` export by its denoiser config), else None."""
    marker = folder / MARKER
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text()).get("format"))
        except (json.JSONDecodeError, OSError, AttributeError):
            return None
    for name in ("unet", "transformer"):  # exports written before the marker
        cfg = folder / name / "config.json"
        try:
            if (
                cfg.is_file()
                and json.loads(cfg.read_text()).get("quantization_config", {}).get("quant_method") == "mpq"
            ):
                return "mpq"
        except (json.JSONDecodeError, OSError, AttributeError):
            return None
    return None


def export_source(folder: Path) -> dict[str, Any] | None:
    """The model an export was made from, as its marker records it (model id, architecture fingerprint, a weights
    sample: :func:`mpq.quant.model.same_weights`); None for an export written before it was recorded."""
    try:
        source = json.loads((folder / MARKER).read_text()).get("source")
    except (json.JSONDecodeError, OSError, AttributeError):
        return None
    return source if isinstance(source, dict) else None


def export_kind(fmt: str) -> OutputKind:
    """What a ``fmt`` export leaves in its folder: the marker, a pipeline's files (its index and component
    folders), torchao's config and tables, encodings files, a GGUF file and its tensor-type rules."""
    return OutputKind(
        f"mpq {fmt} export",
        (
            MARKER,
            "model_index.json",
            "*/*",  # the pipeline's component folders, as save_pretrained writes them
            "torchao_config.json",
            "torchao_layers.csv",
            "torchao_summary.json",
            "*.encodings",
            "*.gguf",
            "tensor_type_rules.txt",
        ),
        lambda f: export_format(f) == fmt,
    )


def check_target(out: Path, fmt: str, run_root: Path, overwrite: bool) -> None:
    """A one-line error unless ``out`` may receive a ``fmt`` export (see the module)."""
    kind = export_format(out) if out.is_dir() and not out.is_symlink() else None
    if kind not in (None, fmt) and not overwrite:
        raise MpqError(
            f"--out {out} exists and is an mpq {kind} export, not {fmt}; give a new folder, or --overwrite to replace "
            "it (the old one is set aside)"
        )
    hint = " (or --overwrite: the old folder is set aside, never deleted)"
    check_output_folder(out, "--out", export_kind(fmt), run_root, overwrite=overwrite, hint=hint)


def _alive(marker: Path) -> bool:
    """Whether the export that wrote ``marker`` may still be running (its process exists on this host)."""
    try:
        made = json.loads(marker.read_text())
        if made.get("host") != socket.gethostname():
            return True
        os.kill(int(made["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError, TypeError, json.JSONDecodeError, OSError):
        return False
    return True


def _clean_leftovers(out: Path) -> None:
    """Hidden temp / old folders of an export killed earlier (only those carrying the marker of a process that is
    gone: an export running beside this one keeps its folder)."""
    if not out.parent.is_dir():
        return
    for prefix in (f".{out.name}.tmp-", f".{out.name}.old-"):
        for p in out.parent.glob(prefix + "*"):
            marker = next((m for m in (p / MARKER, p / out.name / MARKER) if m.is_file()), None)
            if p.is_dir() and marker is not None and not _alive(marker):
                shutil.rmtree(p, ignore_errors=True)


@contextmanager
def export_folder(
    out: str | Path, fmt: str, run_root: Path, overwrite: bool = False, source: dict[str, Any] | None = None
) -> Iterator[Path]:
    """Yield a temp folder to write the export into; on success it replaces ``out`` (checked first, see the module).
    ``source``: the model it is made from, recorded in the marker (:func:`export_source`)."""
    out = Path(os.path.abspath(out))  # "." and "dir/.." have a name to put temp folders beside
    check_target(out, fmt, run_root, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        raise MpqError(
            f"--out {out}: cannot create a folder beside it ({err.strerror or err}); choose a writable place"
        ) from None
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; an export is an ordinary folder
    try:
        made = {"format": fmt, "pid": os.getpid(), "host": socket.gethostname(), "source": source}
        (tmp / MARKER).write_text(json.dumps(made) + "\n")
        yield tmp
        try:
            if out.exists() and not is_replaceable(out, export_kind(fmt)):  # --overwrite of a folder mpq did not make
                kept = set_aside(out)
                print(f"mpq: the earlier content of {out} was moved to {kept}", file=sys.stderr)
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except OSError as err:
            raise MpqError(f"--out {out}: the export could not be moved into place ({err.strerror or err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
