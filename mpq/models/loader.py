"""Load a pipeline (hub id, local folder, embedded) and build denoisers on meta."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mpq.errors import MpqError

EMBEDDED_PREFIX = "embedded:"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# the trained shapes model ships with the package; the untrained one is built from a seed on first use
EMBEDDED = {
    "tiny-sdxl": "trained on procedural shapes, shipped",
    "tiny-sdxl-random": "same architecture, random weights",
}
ARCH_DIR = Path(__file__).resolve().parent / "arch"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # the config's dtype names
DENOISERS = ("unet", "transformer")  # a pipeline's denoiser component, by name


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def denoiser_name(components: Any) -> str:
    """The denoiser's component name among ``components`` (names, or a mapping of them)."""
    for name in DENOISERS:
        if name in components:
            return name
    raise MpqError(f"no {' or '.join(DENOISERS)} among the pipeline's components ({', '.join(sorted(components))})")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MpqError(f"model.device={name} but no CUDA GPU is visible; use model.device=cpu or auto")
    return torch.device(name)


def cache_dir() -> Path:
    return Path(os.environ.get("MPQ_CACHE", Path.home() / ".cache" / "mpq"))


def quiet_loading() -> None:
    """No per-shard progress bars or info logs from diffusers/transformers while loading."""
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    dlogging.set_verbosity_error()
    tlogging.set_verbosity_error()


def _embedded_folder(name: str) -> Path:
    """The shipped trained model's folder, or the random one built once into the cache."""
    from mpq.models import tiny

    if name not in EMBEDDED:
        avail = ", ".join(f"{EMBEDDED_PREFIX}{e} ({why})" for e, why in sorted(EMBEDDED.items()))
        raise MpqError(f"unknown embedded model '{EMBEDDED_PREFIX}{name}'; available: {avail}")
    if name == "tiny-sdxl":
        folder = WEIGHTS_DIR / name
        if not (folder / "model_index.json").is_file():
            raise MpqError(
                f"the embedded model's weights are missing from the package ({folder}); reinstall mpq, "
                "or train them with `python scripts/train_tiny.py --outdir DIR` and set model.id=DIR"
            )
        return folder
    folder = cache_dir() / f"{name}-seed{tiny.TINY_SEED}-v2"
    if (folder / "model_index.json").is_file():
        return folder
    quiet_loading()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        tiny.build_pipeline(tiny.TINY_SEED).save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _source(model_id: str) -> str:
    if model_id.startswith(EMBEDDED_PREFIX):
        return str(_embedded_folder(model_id[len(EMBEDDED_PREFIX) :]))
    p = Path(model_id).expanduser()
    if p.exists():
        if not (p / "model_index.json").is_file():
            raise MpqError(
                f"model.id={model_id} is a folder without model_index.json; point it at a diffusers pipeline folder"
            )
        return str(p)
    if model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        raise MpqError(f"model.id={model_id}: no such folder, and not a hub id of the form owner/name")
    return model_id


def _set_scheduler(pipe: Any, cfg: DictConfig) -> None:
    from diffusers import (
        DDIMScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    kinds = {"euler_ancestral": EulerAncestralDiscreteScheduler, "euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}
    if cfg.sampling.scheduler == "keep":
        return
    cls = kinds[cfg.sampling.scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, timestep_spacing=cfg.sampling.timestep_spacing)


def load_pipeline(cfg: DictConfig, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
    """Load the configured pipeline on its device and dtype (``model.dtype`` unless ``dtype``), eval mode, no
    progress bar."""
    from diffusers import DiffusionPipeline

    quiet_loading()
    source = _source(cfg.model.id)
    dtype = dtype or torch_dtype(cfg.model.dtype)
    device = device or resolve_device(cfg.model.device)
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if cfg.model.variant and not cfg.model.id.startswith(EMBEDDED_PREFIX):
        kwargs["variant"] = cfg.model.variant
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except Exception as err:  # noqa: BLE001 - any load failure becomes one actionable line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        if Path(source).exists():
            raise MpqError(f"cannot load the pipeline in {source}: {reason}") from None
        raise MpqError(
            f"cannot load '{source}' from the hub ({reason}); offline, download it elsewhere "
            f"(`hf download {source} --local-dir DIR`) and set model.id=DIR"
        ) from None
    _set_scheduler(pipe, cfg)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return pipe


def pipeline_in(cfg: DictConfig, dtype: torch.dtype, pipe: Any | None = None) -> Any:
    """``pipe`` if its denoiser computes in ``dtype``, else the configured pipeline loaded in ``dtype``."""
    if pipe is not None and next(denoiser_of(pipe).parameters()).dtype == dtype:
        return pipe
    return load_pipeline(cfg, dtype=dtype)


def denoiser_of(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoiser (its UNet or transformer)."""
    for name in DENOISERS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise MpqError(
        f"{type(pipe).__name__} is neither a torch module nor a pipeline with a {' or '.join(DENOISERS)} to quantize"
    )


def load_arch(cfg: DictConfig) -> dict[str, Any]:
    """Architecture facts (denoiser config, VAE scale, text length) without weights."""
    from mpq.models import tiny

    model_id = cfg.model.id
    if model_id == EMBEDDED_PREFIX + "tiny-sdxl-random":
        return tiny.arch()
    p = Path(_source(model_id) if model_id.startswith(EMBEDDED_PREFIX) else model_id).expanduser()
    if p.is_dir():
        unet_cfg = p / "unet" / "config.json"
        vae_cfg = p / "vae" / "config.json"
        if not unet_cfg.is_file():
            raise MpqError(f"{p} has no unet/config.json; only UNet pipelines can be built on the meta device")
        vae_scale = 2 ** (len(json.loads(vae_cfg.read_text())["block_out_channels"]) - 1) if vae_cfg.is_file() else 8
        tok_cfg = p / "tokenizer" / "tokenizer_config.json"
        max_len = json.loads(tok_cfg.read_text()).get("model_max_length", 77) if tok_cfg.is_file() else 77
        return {
            "unet": json.loads(unet_cfg.read_text()),
            "vae_scale_factor": vae_scale,
            "text_max_length": min(int(max_len), 77),
        }
    known = ARCH_DIR / (model_id.replace("/", "--") + ".json")
    if known.is_file():
        return json.loads(known.read_text())
    shipped = ", ".join(sorted(f.stem.replace("--", "/") for f in ARCH_DIR.glob("*.json")))
    raise MpqError(
        f"no offline architecture for '{model_id}' (shipped: {shipped}); point model.id at a local diffusers folder"
    )


def meta_denoiser(arch: dict[str, Any]) -> torch.nn.Module:
    """The denoiser built on the meta device: shapes and names, no weights, no memory."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in arch["unet"].items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config).eval()
