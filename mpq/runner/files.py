"""Atomic artifact I/O: every file is written to a temp file, then renamed."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mpq.errors import MpqError


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it onto ``path`` on success."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; an artifact is an ordinary file
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_digest(path: str | os.PathLike[str]) -> str:
    """The content hash of a file (freshness by content, never by file times: a copied run directory stays fresh)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Atomically write ``path`` with ``writer(tmp_path)`` (PIL save, torch.save, ...)."""
    with atomic_path(path) as tmp:
        writer(tmp)


FORMATS_SUFFIX = ".formats.yaml"


def formats_twin(path: str | Path) -> Path:
    """``x.formats.yaml`` for ``x.yaml``: where a plan with weight formats is written instead of ``x.yaml``, and the
    formats' sensitivity scores beside ``x.yaml`` (``mpq.plan``, ``mpq.search.mixdq_files``); a path already so
    named, or not a ``.yaml``, is itself."""
    p = Path(path)
    if p.name.endswith(FORMATS_SUFFIX) or p.suffix != ".yaml":
        return p
    return p.with_name(p.name.removesuffix(".yaml") + FORMATS_SUFFIX)


def write_yaml(path: str | os.PathLike[str], data: Any) -> None:
    write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _existing(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.is_file():
        raise MpqError(f"{p}: file not found")
    return p


def read_yaml(path: str | os.PathLike[str]) -> Any:
    p = _existing(path)
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise MpqError(f"{p}: not valid YAML{where}; fix or delete the file") from None


def read_json(path: str | os.PathLike[str]) -> Any:
    p = _existing(path)
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        raise MpqError(f"{p}: not valid JSON (corrupt or half-written); delete it and re-run the stage") from None


def save_tensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    p = _existing(path)
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as err:
        raise MpqError(
            f"{p}: corrupt safetensors file ({str(err).splitlines()[0]}); delete it and re-run the stage"
        ) from None


def read_tensor_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    from safetensors import safe_open

    p = _existing(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise MpqError(
            f"{p}: corrupt safetensors file ({str(err).splitlines()[0]}); delete it and re-run the stage"
        ) from None


def write_csv(
    path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], columns: Sequence[str], digits: int = 6
) -> None:
    """Atomically write ``rows`` under ``columns`` (extra keys ignored; floats with ``digits`` significant digits)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.{digits}g}" if isinstance(v, float) else v) for k, v in r.items()})
    write_text(path, buf.getvalue())


def record_columns(cls: type) -> tuple[str, ...]:
    """The CSV columns of a record dataclass: its fields, less those marked ``metadata={"csv": False}``."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("csv", True))


def write_records(path: str | os.PathLike[str], rows: Sequence[Any], cls: type, digits: int = 6) -> None:
    """Atomically write dataclass ``rows`` as a CSV table, one column per field (:func:`record_columns`)."""
    columns = record_columns(cls)
    write_csv(path, [{c: getattr(r, c) for c in columns} for r in rows], columns, digits)


def read_records(path: str | os.PathLike[str], cls: type, fix: str) -> list[Any]:
    """The rows of a table written by :func:`write_records`, typed by the dataclass's field types (float: '' is NaN,
    bool, str); an empty table, a missing column or a bad value is a one-line error ending in ``fix``."""
    rows = read_csv(path)
    columns = record_columns(cls)
    if not rows:
        raise MpqError(f"{path}: no rows; {fix}")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise MpqError(f"{path}: column {missing[0]} is missing (written by another mpq version?); {fix}")
    types = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in dataclasses.fields(cls)}
    out = []
    for n, r in enumerate(rows, start=2):
        values = {}
        for c in columns:
            v = r[c]
            if types[c] == "float":
                try:
                    values[c] = float(v) if v != "" else math.nan
                except ValueError:
                    raise MpqError(f"{path} line {n}: column {c} has {v!r}, not a number; {fix}") from None
            elif types[c] == "bool":
                if v not in ("True", "False"):
                    raise MpqError(f"{path} line {n}: column {c} has {v!r}, not True/False; {fix}")
                values[c] = v == "True"
            else:
                values[c] = v
        out.append(cls(**values))
    return out


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    p = _existing(path)
    return list(csv.DictReader(io.StringIO(p.read_text())))


def write_layer_list(path: str | os.PathLike[str], names: Iterable[str]) -> None:
    """Write a list of layer names as MixDQ does (``torch.save`` of a list of str). Serialized in memory first, so
    the archive's inner name is fixed and equal lists give equal files."""
    buf = io.BytesIO()
    torch.save(list(names), buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
