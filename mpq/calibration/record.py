"""Calibration: run the FP pipeline, record the denoiser's I/O per step, save FP images.

Run-directory layout written here::

    calib/meta.json                 prompts, seeds, steps, rows, fields, model fingerprint
    calib/step_000.safetensors      one file a denoiser call of a generation (a step; PNDM's warm-up
                                    calls too): every denoiser input
                                    (flattened: sample, timestep, encoder_hidden_states,
                                    added_cond_kwargs.text_embeds, ...) and ``output``
    fp_images/0000.png ...          FP reference image i = prompt i with seed + i

The denoiser calls are recorded exactly as the pipeline makes them: under
classifier-free guidance a call holds the negative and the positive half, so
a step holds ``rows`` = 2 x ``num_samples`` rows, and every later stage replays
both. Inputs the family adapter names as shared (Flux's token positions) are
not batch-major: stored once, given whole to every batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mpq.errors import MpqError
from mpq.families import family_of
from mpq.images import generate, save_images
from mpq.models import denoiser_of, load_pipeline
from mpq.prompts import cycle, read_prompts
from mpq.quant.model import fingerprint, weights_sample
from mpq.runner.files import load_tensors, read_json, save_tensors, write_json
from mpq.runner.progress import progress
from mpq.runner.rundir import RunDir

OUTPUT_KEY = "output"


# --------------------------------------------------------------------------- prompts
def load_prompts(cfg: DictConfig, n: int) -> tuple[list[str], list[int]]:
    """``n`` calibration prompts (cycled if the list is shorter) and their seeds ``seed + i``."""
    return cycle(read_prompts(cfg.calib.prompts_file), n, cfg.sampling.seed)


# --------------------------------------------------------------------------- recording
def _flatten(prefix: str, value: Any, out: dict[str, torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out[prefix] = value.detach()
    elif isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)


def unflatten(flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, t in flat.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = t
        else:
            nested[head] = t
    return nested


class DenoiserRecorder:
    """Forward hook recording every call's named inputs and output."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        self.family = family_of(denoiser)
        self._params = list(inspect.signature(denoiser.forward).parameters)
        self._handle = denoiser.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        named = dict(zip(self._params, args)) | kwargs
        flat: dict[str, torch.Tensor] = {}
        for k, v in named.items():
            _flatten(k, v, flat)
        batch = flat[self.family.sample_key].shape[0]
        if "timestep" in flat and flat["timestep"].numel() != batch:
            flat["timestep"] = flat["timestep"].reshape(-1).expand(batch).clone()
        out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        flat[OUTPUT_KEY] = out.detach()
        self.calls.append({k: v.cpu() for k, v in flat.items()})

    def close(self) -> None:
        self._handle.remove()


# --------------------------------------------------------------------------- data
@dataclass
class CalibData:
    """The recorded denoiser I/O of a run, one dict of tensors per step."""

    steps: list[dict[str, torch.Tensor]]
    meta: dict[str, Any]

    @classmethod
    def open(cls, run: RunDir) -> CalibData:
        meta = read_meta(run)
        fix = f"delete {run.calib} or re-run `mpq calib --force --base_path {run.root}`"
        key, rows = meta.get("sample_key", "sample"), meta.get("rows", meta["num_samples"])
        steps = []
        for k in range(meta["steps"]):
            path = run.calib / f"step_{k:03d}.safetensors"
            step = load_tensors(path)
            if OUTPUT_KEY not in step or key not in step or step[key].shape[0] != rows:
                raise MpqError(f"{path} does not hold {rows} recorded denoiser rows (damaged calibration data); {fix}")
            steps.append(step)
        return cls(steps, meta)

    @property
    def num_samples(self) -> int:
        return int(self.meta["num_samples"])

    @property
    def shared(self) -> frozenset[str]:
        """The recorded inputs that are not batch-major (one copy for every row)."""
        return frozenset(self.meta.get("shared", ()))

    def rows(self, step: dict[str, torch.Tensor]) -> int:
        return step[OUTPUT_KEY].shape[0]

    def first_tokens(self, key: str) -> torch.Tensor | None:
        """The first token of input ``key`` (the text tokens: rows, tokens, width) of every row of the first call
        (every prompt, both guidance halves; the text is the same at every step), or None if not recorded."""
        t = self.steps[0].get(key)
        return t[:, :1] if t is not None and t.dim() == 3 else None

    def batches(
        self, batch_size: int, device: torch.device, dtype: torch.dtype | None = None
    ) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        """(denoiser kwargs, recorded output) over all steps, in ``batch_size``-row chunks."""
        for step in self.steps:
            n = self.rows(step)
            for i in range(0, n, batch_size):
                flat = {k: (v if k in self.shared else v[i : i + batch_size]).to(device) for k, v in step.items()}
                if dtype is not None:
                    flat = {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in flat.items()}
                out = flat.pop(OUTPUT_KEY)
                yield unflatten(flat), out

    def num_batches(self, batch_size: int) -> int:
        return sum(-(-self.rows(s) // batch_size) for s in self.steps)


# --------------------------------------------------------------------------- stage
def _merge(key: str, parts: list[torch.Tensor], shared: bool) -> torch.Tensor:
    """One step's recordings of ``key`` over the generation batches: batch-major ones concatenated, a shared one
    kept once (it must be the same in every batch)."""
    if not shared:
        return torch.cat(parts)
    if any(p.shape != parts[0].shape or not torch.equal(p, parts[0]) for p in parts[1:]):
        raise MpqError(f"the denoiser input '{key}' differs between batches, so it cannot be shared; use one batch")
    return parts[0]


def run_calibration(cfg: DictConfig, run: RunDir, pipe: Any | None = None) -> dict[str, Any]:
    """Run the FP pipeline on the calibration prompts; write calib/ and fp_images/."""
    pipe = pipe if pipe is not None else load_pipeline(cfg)
    n = cfg.calib.num_samples
    prompts, seeds = load_prompts(cfg, n)
    denoiser = denoiser_of(pipe)
    recorder = DenoiserRecorder(denoiser)
    per_step: list[list[dict[str, torch.Tensor]]] = []  # one list a denoiser call of a generation
    bs = cfg.sampling.batch_size
    try:
        for i in progress(range(0, n, bs), desc="calib: FP generation", unit="batch"):
            recorder.calls.clear()
            images = generate(pipe, prompts[i : i + bs], seeds[i : i + bs], cfg, batch_size=bs)
            if not per_step:  # a sampler may call the denoiser more often than once a step (PNDM's warm-up)
                per_step = [[] for _ in recorder.calls]
            if len(recorder.calls) != len(per_step) or not per_step:
                raise MpqError(
                    f"the pipeline called the denoiser {len(recorder.calls)} times for a batch, {len(per_step)} for "
                    "the first; calibration needs the same calls for every batch (a sampler with random call counts?)"
                )
            for k, call in enumerate(recorder.calls):
                per_step[k].append(call)
            save_images(images, run.fp_images, start=i)
    finally:
        recorder.close()
    fields: list[str] = []
    shared = [k for k in recorder.family.shared_inputs if k in per_step[0][0]]
    for k, calls in enumerate(per_step):
        merged = {key: _merge(key, [c[key] for c in calls], key in shared) for key in calls[0]}
        fields = list(merged)
        save_tensors(run.calib / f"step_{k:03d}.safetensors", merged)
    meta = {
        "model_id": cfg.model.id,
        "fingerprint": fingerprint(denoiser),
        "weights_sample": weights_sample(denoiser),
        "family": recorder.family.name,
        "sample_key": recorder.family.sample_key,
        "num_samples": n,
        "rows": int(merged[OUTPUT_KEY].shape[0]),
        "shared": shared,
        "steps": len(per_step),  # denoiser calls a generation (sampling.steps for a first-order sampler)
        "sampling_steps": cfg.sampling.steps,
        "guidance_scale": float(cfg.sampling.guidance_scale),
        "fields": fields,
        "prompts": prompts,
        "seeds": seeds,
    }
    write_json(run.calib / "meta.json", meta)
    return meta


META_FIELDS: dict[str, type] = {
    "model_id": str,
    "fingerprint": str,
    "num_samples": int,
    "steps": int,
    "fields": list,
    "prompts": list,
    "seeds": list,
}


def read_meta(run: RunDir) -> dict[str, Any]:
    """``calib/meta.json``, checked: a damaged file is a one-line error naming it and the fix."""
    path = run.require("calib/meta.json", f"run `mpq calib --base_path {run.root}` first")
    meta = read_json(path)
    fix = f"delete {run.calib} or re-run `mpq calib --force --base_path {run.root}`"
    if not isinstance(meta, dict):
        raise MpqError(f"{path} is not a JSON object (damaged calibration data); {fix}")
    for key, kind in META_FIELDS.items():
        if not isinstance(meta.get(key), kind):
            raise MpqError(f"{path} has no valid '{key}' (damaged calibration data); {fix}")
    if len(meta["prompts"]) != meta["num_samples"] or len(meta["seeds"]) != meta["num_samples"] or meta["steps"] < 1:
        raise MpqError(f"{path}: prompts, seeds and num_samples disagree (damaged calibration data); {fix}")
    return meta


def calib_prompts(run: RunDir) -> tuple[list[str], list[int]]:
    meta = read_meta(run)
    return list(meta["prompts"]), list(meta["seeds"])


def fp_image_paths(run: RunDir, n: int) -> list[Path]:
    paths = [run.fp_images / f"{i:04d}.png" for i in range(n)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MpqError(f"{missing[0]} is missing; re-run `mpq calib --force --base_path {run.root}`")
    return paths
