"""Trace dumps: a pipeline run's component inputs and outputs as safetensors files with a manifest, for other
runtimes (ONNX Runtime, a vendor NPU) to be fed the same inputs, and the tensor-by-tensor comparison of two dumps.

Layout of a dump folder::

    manifest.json                  format, what ran, and one entry per tensor, in call order:
                                   name, file, key, component, index, step, role (input|output), shape, dtype
    latents/0.safetensors          the initial latents (prepare_latents' output): fixed input
    text_encoder/0.safetensors     input.0 = the token ids, output.* = the encoder's outputs
    unet/step000.safetensors       the denoiser's inputs and outputs at step 0 (transformer/... for DiTs)
    scheduler/step000.safetensors  the scheduler step: model_output, timestep, sample in; prev_sample out
    vae/0.safetensors              the latents decoded: input.0 in, output.0 (image in [-1, 1]) out

A tensor's ``name`` is ``<call>/<key>`` (``unet/step003/input.sample``). Per-step noise of a stochastic scheduler is
drawn from the seeded CPU generator (``seed`` in the manifest) and shows in the scheduler's outputs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpq.errors import MpqError
from mpq.metrics import ErrorStats
from mpq.runner.files import current_umask, read_json, save_tensors, write_json
from mpq.runner.outputs import OutputKind, check_output_folder, json_field
from mpq.trace.capture import CallId

FORMAT = "mpq-trace-dump/1"
MANIFEST = "manifest.json"
DUMP = OutputKind(
    "trace dump",
    (MANIFEST, "*/*.safetensors", "*.safetensors"),
    lambda folder: json_field(folder / MANIFEST, "format") == FORMAT,
)


def write_dump(
    folder: str | Path,
    calls: Sequence[tuple[CallId, dict[str, torch.Tensor], dict[str, torch.Tensor]]],
    meta: dict[str, Any],
) -> Path:
    """Write ``calls`` into ``folder``, built in a temp folder beside it and renamed into place. ``folder`` may be
    new, empty or an earlier dump holding only a dump's files (replaced); anything else is refused
    (:func:`mpq.runner.outputs.check_output_folder`)."""
    folder = check_output_folder(folder, "--dump", DUMP)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        entries = []
        for cid, inputs, outputs in calls:
            rel = f"{cid.key}.safetensors"
            tensors = {**inputs, **outputs}
            save_tensors(tmp / rel, {k: t.clone() for k, t in tensors.items()})
            for key, t in tensors.items():
                entries.append(
                    {
                        "name": f"{cid.key}/{key}",
                        "file": rel,
                        "key": key,
                        "component": cid.component,
                        "index": cid.index,
                        "step": cid.step,
                        "role": "input" if key.startswith("input") else "output",
                        "shape": list(t.shape),
                        "dtype": str(t.dtype).removeprefix("torch."),
                    }
                )
        write_json(tmp / MANIFEST, {"format": FORMAT, **meta, "tensors": entries})
        os.chmod(tmp, 0o777 & ~current_umask())
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise MpqError(f"{folder} is not a trace dump (no {MANIFEST}); write one with `mpq trace --dump {folder}`")
    m = read_json(folder / MANIFEST)
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("tensors"), list):
        raise MpqError(f"{folder / MANIFEST}: not a {FORMAT} manifest; re-write the dump with `mpq trace --dump`")
    return m


class _Files:
    """Tensors of a dump, opened lazily (one safetensors file per call)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.open = folder, {}

    def get(self, entry: dict[str, Any]) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        path = self.folder / str(entry["file"])
        if not path.resolve().is_relative_to(self.folder.resolve()):
            raise MpqError(
                f"{self.folder / MANIFEST}: tensor {entry.get('key')} names a file outside the dump ({entry['file']}); "
                "re-write the dump"
            )
        try:
            if entry["file"] not in self.open:
                self.open[entry["file"]] = safe_open(str(path), framework="pt")
            return self.open[entry["file"]].get_tensor(entry["key"])
        except (SafetensorError, OSError, ValueError) as err:
            raise MpqError(
                f"{path}: cannot read tensor {entry['key']} ({str(err).splitlines()[0][:100]}); re-write the dump"
            ) from None


@dataclass
class Comparison:
    rows: list[dict[str, Any]]
    first: dict[str, Any] | None  # the first tensor over the tolerance, in A's order


def compare_dumps(a: str | Path, b: str | Path, tol_cos: float = 0.999, tol_sqnr: float = 30.0) -> Comparison:
    """Every tensor of dump ``a`` against the same-named one of ``b`` (``b`` the reference): MAE, cosine, SQNR, max
    error; a tensor missing from either dump or of another shape is a one-line error naming it."""
    a, b = Path(a), Path(b)
    ma, mb = read_manifest(a), read_manifest(b)
    ea, eb = {e["name"]: e for e in ma["tensors"]}, {e["name"]: e for e in mb["tensors"]}
    for name in ea:
        if name not in eb:
            raise MpqError(f"tensor {name} of {a} is missing from {b} (renamed or not dumped); dump the same pipeline")
    for name in eb:
        if name not in ea:
            raise MpqError(f"tensor {name} of {b} is missing from {a} (renamed or not dumped); dump the same pipeline")
    fa, fb = _Files(a), _Files(b)
    rows, first = [], None
    for name, entry in ea.items():
        ref_entry = eb[name]
        if list(entry["shape"]) != list(ref_entry["shape"]):
            raise MpqError(f"tensor {name}: shape {entry['shape']} in {a}, {ref_entry['shape']} in {b}")
        ta, tb = fa.get(entry), fb.get(ref_entry)
        if list(ta.shape) != list(entry["shape"]) or list(tb.shape) != list(ref_entry["shape"]):
            raise MpqError(f"tensor {name}: the file's shape differs from its manifest; re-write the dump")
        s = ErrorStats().update(ta, tb).as_dict()
        row = {"name": name, "component": entry["component"], "step": entry["step"], "role": entry["role"], **s}
        rows.append(row)
        if first is None and (s["cos"] < tol_cos or s["sqnr_db"] < tol_sqnr):
            first = row
    return Comparison(rows, first)
