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
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mpq.errors import MpqError
from mpq.families import family_of
from mpq.images import generate, save_images
from mpq.models import denoiser_of, load_pipeline, torch_dtype
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
            path = run.calib_step(k)
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


PLAUSIBLE_SAMPLES = 2048  # MixDQ calibrates on 1,024 prompts at most; far more is a typo more often than a plan


def recorded_bytes(cfg: DictConfig) -> int:
    """About how many bytes the calibration holds in memory until it ends: per sample, every denoiser call's latent
    input and output and its text states (from the architecture, before any model call)."""
    from mpq.models.loader import load_arch

    arch = load_arch(cfg)
    den = arch["denoiser"]
    side = cfg.sampling.resolution // int(arch["vae_scale_factor"])
    latent = int(den.get("in_channels") or 4) * side * side
    if int(den.get("in_channels") or 4) == 64:  # Flux packs 2x2 patches of 16 channels into 64
        latent //= 4
    text_dim = den.get("joint_attention_dim") or den.get("caption_channels") or den.get("cross_attention_dim") or 0
    rows = 2 if cfg.sampling.guidance_scale > 1 else 1  # classifier-free guidance batches both halves
    per_call = rows * (2 * latent + int(arch["text_max_length"]) * int(text_dim))
    return int(cfg.calib.num_samples) * cfg.sampling.steps * per_call * torch_dtype(cfg.model.dtype).itemsize


def warn_implausible(cfg: DictConfig) -> str | None:
    """A warning (stderr) before calibration when ``calib.num_samples`` is far above what calibration needs or its
    recordings would not fit in memory: the expected memory, the batches, and the fix."""
    n = int(cfg.calib.num_samples)
    need = recorded_bytes(cfg)
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    if n <= PLAUSIBLE_SAMPLES and not (ram and need > ram // 2):
        return None
    batches = -(-n // cfg.sampling.batch_size)
    msg = (
        f"mpq: warning: calib.num_samples={n:,} holds about {need / 2**30:,.1f} GiB of denoiser inputs in memory until "
        f"the stage ends{f' (this machine has {ram / 2**30:,.0f} GiB)' if ram else ''} and generates {batches:,} "
        f"batches (the progress bar gives the time after the first); MixDQ calibrates on at most 1,024: lower it "
        "unless you mean it"
    )
    print(msg, file=sys.stderr)
    return msg


def run_calibration(cfg: DictConfig, run: RunDir, pipe: Any | None = None) -> dict[str, Any]:
    """Run the FP pipeline on the calibration prompts; write calib/ and fp_images/."""
    warn_implausible(cfg)  # before the model loads or runs
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
        save_tensors(run.calib_step(k), merged)
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
        "sampling": reference_sampling(cfg),
        "fields": fields,
        "prompts": prompts,
        "seeds": seeds,
    }
    write_json(run.calib_meta, meta)
    return meta


REFERENCE_KEYS = ("steps", "guidance_scale", "resolution", "scheduler", "timestep_spacing", "max_sequence_length")


def reference_sampling(cfg: DictConfig) -> dict[str, Any]:
    """The sampling settings an FP reference image depends on (the seed is recorded per image)."""
    sampling = OmegaConf.to_container(cfg.sampling, resolve=True)
    assert isinstance(sampling, dict)
    return {k: sampling[k] for k in REFERENCE_KEYS}


def reference_mismatch(meta: dict[str, Any], cfg: DictConfig) -> list[str]:
    """``key: references' value -> cfg's value`` for every sampling setting where the run's FP references were
    made otherwise than ``cfg`` samples (older runs recorded steps and guidance only)."""
    now = reference_sampling(cfg)
    made = meta.get("sampling") or {"steps": meta.get("sampling_steps"), "guidance_scale": meta.get("guidance_scale")}
    return [
        f"sampling.{k}: {made[k]} -> {now[k]}"
        for k in REFERENCE_KEYS
        if k in made and made[k] is not None and made[k] != now[k]  # 2 == 2.0: recorded floats compare as numbers
    ]


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
    path = run.require(run.calib_meta, f"run `mpq calib --base_path {run.root}` first")
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


def calib_prompts(run: RunDir, n: int | None = None, asked: str = "") -> tuple[list[str], list[int]]:
    """The run's calibration prompts and seeds (those with FP references); the first ``n`` when given, with a note
    naming ``asked`` (the setting that wanted them) when the run has fewer."""
    meta = read_meta(run)
    prompts, seeds = list(meta["prompts"]), list(meta["seeds"])
    if n is None:
        return prompts, seeds
    if n > len(prompts):
        print(
            f"mpq: note: {asked or 'the images asked'} = {n}, but the run has {len(prompts)} calibration prompts with "
            f"FP references: using {len(prompts)} (raise calib.num_samples and re-run calib for more)",
            file=sys.stderr,
        )
    return prompts[:n], seeds[:n]


def fp_image_paths(run: RunDir, n: int) -> list[Path]:
    paths = [run.fp_image(i) for i in range(n)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MpqError(f"{missing[0]} is missing; re-run `mpq calib --force --base_path {run.root}`")
    return paths
