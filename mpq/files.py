"""Atomic artifact I/O: every file is written to a temp file, then renamed."""

from __future__ import annotations

import csv
import io
import json
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
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Atomically write ``path`` with ``writer(tmp_path)`` (PIL save, torch.save, ...)."""
    with atomic_path(path) as tmp:
        writer(tmp)


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


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    p = _existing(path)
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as err:
        raise MpqError(f"{p}: corrupt safetensors file ({str(err).splitlines()[0]}); delete it and re-run the stage") from None


def read_tensor_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    from safetensors import safe_open

    p = _existing(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise MpqError(f"{p}: corrupt safetensors file ({str(err).splitlines()[0]}); delete it and re-run the stage") from None


def write_csv(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Atomically write ``rows`` under ``columns`` (extra keys ignored; floats as %.6g unless pre-formatted)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    write_text(path, buf.getvalue())


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    p = _existing(path)
    return list(csv.DictReader(io.StringIO(p.read_text())))
