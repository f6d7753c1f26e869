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
from mpq.families import COMPONENTS, Family, family_of
from mpq.runner.choices import DTYPES, SCHEDULERS

EMBEDDED_PREFIX = "embedded:"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# the trained shapes model ships with the package; the random ones are built from a seed on first use
EMBEDDED = {
    "tiny-sdxl": "trained on procedural shapes, shipped",
    "tiny-sdxl-random": "same architecture, random weights",
    "tiny-sd3": "SD3.5 architecture (MMDiT, flow matching, guidance), trained on procedural shapes, shipped",
    "tiny-pixart-random": "PixArt-Sigma architecture, T5 text, random weights",
    "tiny-sd3-random": "SD3.5 architecture (MMDiT, flow matching), random weights",
    "tiny-flux-random": "Flux.1-schnell architecture (MMDiT, flow matching), random weights",
}
SHIPPED = ("tiny-sdxl", "tiny-sd3")  # trained: weights in WEIGHTS_DIR, scored by the shapes judge
RANDOM_PREFIX = "random:"  # "random:<hub id>": that model's architecture, full size, random weights (offline)
ARCH_DIR = Path(__file__).resolve().parent / "arch"


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def denoiser_name(components: Any) -> str:
    """The denoiser's component name among ``components`` (names, or a mapping of them)."""
    for name in COMPONENTS:
        if name in components:
            return name
    raise MpqError(f"no {' or '.join(COMPONENTS)} among the pipeline's components ({', '.join(sorted(components))})")


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


def _arch_file(model_id: str) -> Path:
    return ARCH_DIR / (model_id.replace(EMBEDDED_PREFIX, "embedded--").replace("/", "--") + ".json")


def _build(name: str) -> Any:
    """The untrained embedded pipeline ``name`` (deterministic from the seed)."""
    from mpq.models import tiny
    from mpq.models.random import build_random

    if name == "tiny-sdxl-random":
        return tiny.build_pipeline(tiny.TINY_SEED)
    return build_random(json.loads(_arch_file(EMBEDDED_PREFIX + name).read_text()), tiny.TINY_SEED)


def _embedded_folder(name: str) -> Path:
    """The shipped trained model's folder, or a random one built once into the cache."""
    import hashlib

    from mpq.models import tiny

    if name not in EMBEDDED:
        avail = ", ".join(f"{EMBEDDED_PREFIX}{e} ({why})" for e, why in sorted(EMBEDDED.items()))
        raise MpqError(f"unknown embedded model '{EMBEDDED_PREFIX}{name}'; available: {avail}")
    if name in SHIPPED:
        folder = WEIGHTS_DIR / name
        if not (folder / "model_index.json").is_file():
            raise MpqError(
                f"the embedded model's weights are missing from the package ({folder}); reinstall mpq, "
                f"or train them with `python scripts/train_tiny.py --model {name} --outdir DIR` and set model.id=DIR"
            )
        return folder
    if name == "tiny-sdxl-random":
        folder = cache_dir() / f"{name}-seed{tiny.TINY_SEED}-v2"
    else:  # keyed by the architecture file: an edited architecture is built anew
        digest = hashlib.sha256(_arch_file(EMBEDDED_PREFIX + name).read_bytes()).hexdigest()[:10]
        folder = cache_dir() / f"{name}-seed{tiny.TINY_SEED}-{digest}"
    if (folder / "model_index.json").is_file():
        return folder
    quiet_loading()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        _build(name).save_pretrained(tmp)
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
    if model_id.startswith(RANDOM_PREFIX):
        _random_arch(model_id)  # checks there is one
        return model_id
    p = Path(model_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise MpqError(
                f"model.id={model_id} is a file; point it at the diffusers pipeline folder holding model_index.json"
            )
        read_model_index(p, model_id)
        return str(p)
    if model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        raise MpqError(f"model.id={model_id}: no such folder, and not a hub id of the form owner/name")
    return model_id


def is_flow_matching(scheduler: Any) -> bool:
    """Whether a scheduler (or its class name) samples a flow-matching model (SD3, Flux): FlowMatch* classes."""
    name = scheduler if isinstance(scheduler, str) else type(scheduler).__name__
    return name.startswith("FlowMatch")


def _set_scheduler(pipe: Any, cfg: DictConfig) -> None:
    """``sampling.scheduler``: ``keep`` (the pipeline's own, the default) or an override of the same kind: a
    flow-matching model refuses an epsilon/v-prediction sampler and the other way round (one line)."""
    import diffusers

    choice = cfg.sampling.scheduler
    if choice == "keep":
        return
    cls_name, flow = SCHEDULERS[choice]
    own = type(pipe.scheduler).__name__
    if flow != is_flow_matching(own):
        pred = str(pipe.scheduler.config.get("prediction_type"))
        kind = (
            "flow-matching" if is_flow_matching(own) else pred if pred.endswith("prediction") else f"{pred}-prediction"
        )
        fix = "sampling.scheduler=keep" + (" or flow_euler" if is_flow_matching(own) else " or euler/ddim/dpm")
        raise MpqError(
            f"sampling.scheduler={choice} ({cls_name}) cannot sample {cfg.model.id}, a {kind} model (its scheduler: "
            f"{own}); use {fix}"
        )
    overrides = {} if flow else {"timestep_spacing": cfg.sampling.timestep_spacing}
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)


def _random_arch(model_id: str) -> dict[str, Any]:
    hub_id = model_id[len(RANDOM_PREFIX) :]
    path = ARCH_DIR / (hub_id.replace("/", "--") + ".json")
    arch = json.loads(path.read_text()) if path.is_file() else {}
    if "vae" not in arch:
        have = sorted(
            f.stem.replace("--", "/")
            for f in ARCH_DIR.glob("*.json")
            if "vae" in json.loads(f.read_text()) and not f.stem.startswith("embedded--")
        )
        raise MpqError(
            f"no architecture to build {model_id} from; available: {', '.join(RANDOM_PREFIX + h for h in have)}"
        )
    # a model too large for a small machine keeps its full-size blocks but fewer of them (say so in the arch file)
    arch["denoiser"] = {**arch["denoiser"], **arch.get("random_subset", {})}
    return arch


def is_shipped(model_id: str) -> bool:
    """Whether ``model_id`` is a trained embedded model (its images can be scored by the shapes judge)."""
    return model_id in tuple(EMBEDDED_PREFIX + name for name in SHIPPED)


def read_model_index(folder: Path, model_id: str | None = None) -> dict[str, Any]:
    """A pipeline folder's ``model_index.json``, checked: it exists and parses, and every component it lists has
    its folder; anything else is a one-line error naming the file or the component."""
    what = f"model.id={model_id}" if model_id is not None else str(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise MpqError(f"{what} is a folder without model_index.json; point it at a diffusers pipeline folder")
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MpqError(f"{what}: {index_path} is not valid JSON ({err}); re-download or re-save the pipeline") from None
    if not isinstance(index, dict):
        raise MpqError(f"{what}: {index_path} is not a pipeline index (a JSON object); re-save the pipeline")
    for name, entry in index.items():
        listed = isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and entry[1] is not None
        if listed and not name.startswith("_") and not (folder / name).is_dir():
            raise MpqError(
                f"{what}: component '{name}' ({entry[1]}) is listed in model_index.json but {folder / name} is "
                "missing; copy the whole pipeline folder, or set it to [null, null] there to load without it"
            )
    return index


def absent_components(source: str) -> dict[str, None]:
    """Components a local folder saved as absent (``[null, null]`` in model_index.json, e.g. SD3 without T5):
    diffusers wants them passed as ``None`` explicitly, as a user loading such a folder would."""
    if not (Path(source) / "model_index.json").is_file():
        return {}
    entries = read_model_index(Path(source))
    optional = {"safety_checker", "feature_extractor", "image_encoder"}
    return {k: None for k, v in entries.items() if v == [None, None] and k not in optional}


def load_pipeline(cfg: DictConfig, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
    """Load the configured pipeline on its device and dtype (``model.dtype`` unless ``dtype``), eval mode, no
    progress bar; its denoiser must be of a supported family (one-line error otherwise)."""
    from diffusers import DiffusionPipeline

    quiet_loading()
    source = _source(cfg.model.id)
    dtype = dtype or torch_dtype(cfg.model.dtype)
    device = device or resolve_device(cfg.model.device)
    if source.startswith(RANDOM_PREFIX):
        from mpq.models.random import build_random
        from mpq.models.tiny import TINY_SEED

        pipe = build_random(_random_arch(source), TINY_SEED).to(dtype=dtype)
    else:
        # no safety checker (SD1.5): a false NSFW hit would black out an FP or quantized image, and with it every
        # image metric; pipelines without one ignore the argument
        kwargs: dict[str, Any] = {"torch_dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
        if cfg.model.variant and not cfg.model.id.startswith(EMBEDDED_PREFIX):
            kwargs["variant"] = cfg.model.variant
        kwargs.update(absent_components(source))
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
    family_of(denoiser_of(pipe))  # an unsupported denoiser stops here, in one line
    _set_scheduler(pipe, cfg)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
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
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise MpqError(
        f"{type(pipe).__name__} is neither a torch module nor a pipeline with a {' or '.join(COMPONENTS)} to quantize"
    )


def _normalized(arch: dict[str, Any]) -> dict[str, Any]:
    """An architecture record with ``denoiser`` (its config, ``_class_name`` included), ``vae_scale_factor`` and
    ``text_max_length`` (files written before other families: a ``unet`` entry)."""
    if "unet" in arch and "denoiser" not in arch:
        arch = dict(arch, denoiser={"_class_name": "UNet2DConditionModel", **arch["unet"]})
        arch.pop("unet")
    arch["denoiser"].setdefault("_class_name", "UNet2DConditionModel")
    family_of(arch["denoiser"]["_class_name"])  # unsupported: one line
    return arch


def load_arch(cfg: DictConfig) -> dict[str, Any]:
    """Architecture facts (denoiser config and class, VAE scale, text length) without weights."""
    from mpq.models import tiny

    model_id = cfg.model.id
    if model_id == EMBEDDED_PREFIX + "tiny-sdxl-random":
        return _normalized(tiny.arch())
    if model_id.startswith(EMBEDDED_PREFIX) and _arch_file(model_id).is_file():
        return _normalized(json.loads(_arch_file(model_id).read_text()))
    if model_id.startswith(RANDOM_PREFIX):
        return _normalized(_random_arch(model_id))
    p = Path(_source(model_id) if model_id.startswith(EMBEDDED_PREFIX) else model_id).expanduser()
    if p.is_dir():
        index = read_model_index(p) if (p / "model_index.json").is_file() else {}
        component = next((c for c in COMPONENTS if c in index or (p / c / "config.json").is_file()), None)
        if component is None:
            raise MpqError(f"{p} has no {' or '.join(f'{c}/config.json' for c in COMPONENTS)}")
        den = json.loads((p / component / "config.json").read_text())
        vae_cfg = p / "vae" / "config.json"
        vae_scale = 2 ** (len(json.loads(vae_cfg.read_text())["block_out_channels"]) - 1) if vae_cfg.is_file() else 8
        family = family_of(den.get("_class_name", "UNet2DConditionModel"))
        text_len = family.default_text_tokens(str(index.get("_class_name", "")))
        return _normalized({"denoiser": den, "vae_scale_factor": vae_scale, "text_max_length": text_len})
    known = ARCH_DIR / (model_id.replace("/", "--") + ".json")
    if known.is_file():
        return _normalized(json.loads(known.read_text()))
    shipped = ", ".join(sorted(f.stem.replace("--", "/") for f in ARCH_DIR.glob("*.json") if "embedded" not in f.stem))
    raise MpqError(
        f"no offline architecture for '{model_id}' (shipped: {shipped}); point model.id at a local diffusers folder"
    )


def arch_family(arch: dict[str, Any]) -> Family:
    return family_of(arch["denoiser"]["_class_name"])


def meta_denoiser(arch: dict[str, Any]) -> torch.nn.Module:
    """The denoiser built on the meta device: shapes and names, no weights, no memory."""
    import diffusers

    den = arch["denoiser"]
    config = {k: v for k, v in den.items() if not k.startswith("_")}
    with torch.device("meta"):
        return getattr(diffusers, den["_class_name"]).from_config(config).eval()


def meta_inputs(
    arch: dict[str, Any], resolution: int, max_sequence_length: int | None, batch: int = 1
) -> dict[str, Any]:
    """Denoiser kwargs of the right shapes (meta device) for one call at ``resolution`` px."""
    family = arch_family(arch)
    tokens = family.text_tokens(arch, max_sequence_length)
    return family.example_inputs(arch["denoiser"], resolution // arch["vae_scale_factor"], tokens, batch, "meta")
