"""Configs: find one by name or path, compose it with Hydra, validate it.

A config is a YAML file under ``configs/`` (a Hydra tree: a file may start
with ``defaults: [other-config, _self_]`` to inherit). It is merged onto the
typed schema below, so an unknown key or a wrongly typed value is an error
that names the key, and then ``key=value`` overrides are applied.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from mpq.errors import MpqError
from mpq.runner import choices


# --------------------------------------------------------------------------- schema
@dataclass
class ModelConfig:
    # "embedded:tiny-sdxl", a hub id ("stabilityai/sdxl-turbo") or a local diffusers folder
    id: str = "embedded:tiny-sdxl"
    dtype: str = "fp32"  # fp32 | fp16 | bf16 (quantizer statistics are always fp32)
    device: str = "auto"  # auto -> cuda if available, else cpu
    variant: str | None = None  # e.g. "fp16" weights variant on the hub


@dataclass
class SamplingConfig:
    steps: int = 1
    resolution: int = 512
    guidance_scale: float = 0.0  # > 1: classifier-free guidance (UNet, PixArt, SD3); Flux.1-dev: the embedded guidance
    # keep: the pipeline's own scheduler | euler_ancestral | euler | ddim | dpm (epsilon/v-prediction models) |
    # flow_euler (flow-matching models: SD3, Flux); an override of the wrong kind is refused
    scheduler: str = "keep"
    timestep_spacing: str = "trailing"  # for an epsilon/v-prediction override
    max_sequence_length: int | None = None  # T5 text tokens (PixArt, SD3, Flux); null: the pipeline's default
    seed: int = 42  # image i uses seed + i, whatever the batching
    batch_size: int = 4


@dataclass
class CalibConfig:
    num_samples: int = 32
    prompts_file: str | None = (
        None  # a file (one prompt a line) or builtin:captions|shapes|shapes-heldout; null: builtin:captions
    )
    batch_size: int = 8  # denoiser batch for the PTQ observation pass


@dataclass
class WeightQuantConfig:
    # asymmetric: w = q * scale + offset, 2^b levels | symmetric: w = q * scale, 2^b - 1 levels (MixDQ's)
    levels: str = "asymmetric"
    # tensor | channel (MixDQ's: per output channel) | kernel (per output channel and conv kernel position) |
    # group (per output channel, kernel position and block of group_size input channels); every stored scale and
    # offset is priced by the cost model. Default: what had the lowest image MSE at equal bytes (README, Quantizer)
    granularity: str = "kernel"
    group_size: int = 128
    scale_method: str = "minmax"  # minmax | mse
    mse_grid: int = 50  # clipping ratios tried by the MSE search
    mse_min_ratio: float = 0.3  # smallest clipping ratio tried


@dataclass
class ActQuantConfig:
    symmetric: bool = False  # per tensor (per input part), running min-max
    momentum: float = 0.95  # running statistics: r = m * r + (1 - m) * batch
    # cross-attention to_k/to_v: the text's first (BOS) token stays FP and out of the range (MixDQ)
    bos_aware: bool = True
    # mpq: the FP model, calibration batches in order, one range update per batch | mixdq: MixDQ's loop --
    # shuffled batches, W8A8 on while observing (ranges so far), the range updated once per candidate bit
    calibration: str = "mpq"
    # activation ranges per group of sampling steps (timestep-aware; 1: one range over all steps): the recorded
    # calls' timesteps cut into this many groups, each with its own range besides the all-steps one
    step_groups: int = 1


@dataclass
class QuantConfig:
    bits: list[int] = field(default_factory=lambda: [2, 4, 8])
    # a layer whose input concatenates two tensors (UNet up blocks: upsampled features + skip) quantizes
    # each part with its own weight and activation quantizer (MixDQ's conv_shortcut split)
    split_shortcut: bool = True
    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    act: ActQuantConfig = field(default_factory=ActQuantConfig)
    # weight formats calibrated besides the integer bits, in the same pass and checkpoint (mpq/quant/formats.py):
    # nf7 | nf12 | nf16 | nf24 | nf32 (NormalFloat codebooks, 64-element blocks), fp8 (e4m3, per-channel scale),
    # int<b>-<sym|asym>-<tensor|channel|kernel|g<N>> (an integer grid with its own scales); the search considers a
    # format where search.weight.bits_content / bits_quality name it
    weight_formats: list[str] = field(default_factory=list)


@dataclass
class GroupsConfig:
    # a layer is "content" if a pattern equals one of its dotted name parts
    # (or, for "re:<regex>", the regex matches the name); all others are "quality".
    # null: the denoiser family's default (UNet/PixArt: attn2, ff; SD3/Flux: the text stream; see the README)
    content: list[str] | None = None


@dataclass
class InferConfig:
    num_images: int = 8
    weight_bits: Any = 8  # uniform bits (or a weight format, e.g. nf16) when no plan file is given (None: FP)
    act_bits: int | None = 8


@dataclass
class SensitivityConfig:
    # fast: FP prefix cache (exact) | naive: one full forward per (layer, bit) | local: each layer's own output SQNR,
    # one FP pass | fisher: gradient-weighted output error of the denoising loss, one forward+backward a batch |
    # hybrid: an estimate everywhere, exact SQNR for the uncertain layers and exact SSIM for the content group
    method: str = "fast"
    estimator: str = "fisher"  # hybrid's estimate: local | fisher
    hybrid_fraction: float = 0.25  # hybrid: the most sensitive fraction of layers by the estimate, at any bit, exact
    # dtype of the denoiser for PTQ statistics and sensitivity, whatever model.dtype generates in: in fp16/bf16,
    # quantized-vs-FP levels off at the dtype's own noise and 4-vs-8-bit scores become rounding noise (MixDQ: fp32)
    dtype: str = "fp32"  # fp32 | fp16 | bf16
    ssim: str = "mixdq"  # content metric: mixdq (uniform window of the side - 1, uint8) | gaussian (local, sigma 1.5)
    num_images: int = 8  # SSIM: the first N calibration prompts/seeds, against FP images of the same pass
    batch_size: int = 8  # SQNR: denoiser batch over the calibration data
    # fast: run all candidate bits of a layer in one batched pass? always | never (one pass per bit:
    # bit-identical to naive) | auto: for SSIM (moves it by ~3e-8) but not for SQNR, where batch-size-
    # dependent rounding moves values near the float noise floor (> 70 dB) by up to ~0.1 dB
    share_bits: str = "auto"
    cache_budget_mb: float = 4096.0  # fast: FP activations cached at once; more batches -> more chunks, same numbers
    save_every_s: float = 30.0  # partial results are written this often (0: after every layer)
    # only these layers (names or fnmatch patterns, with or without "model."): a partial run for a look or a
    # test; the search needs every layer, so leave it empty for a real run
    layers: list[str] = field(default_factory=list)


AUTO = "auto"  # search.<kind>.target_bitwidth chosen by measurement (see SearchKindConfig)
REFERENCE_AUTO = {"weight": 4.0, "act": 7.5}  # auto in MixDQ's reference mode: its budgets


def target_bits(s: Any, kind: str, top: float) -> float:
    """``search.<kind>.target_bitwidth`` as average bits: a number as given; ``auto`` is ``top`` (the most bits a
    plan of the kind averages: no fixed budget) in mpq mode, MixDQ's budget in reference mode."""
    t = s[kind].target_bitwidth
    if t != AUTO:
        return float(t)
    return REFERENCE_AUTO[kind] if s.mode == "reference" else float(top)


@dataclass
class SearchKindConfig:
    # the budget selection chooses at (average bits); with sweep: target, the sweep's top (down by sweep_span).
    # auto (mpq mode): no fixed budget; selection takes the fewest bytes whose images are no worse than the uniform
    # plan at the most bits (activations: A8), and selection/<kind>_curve.csv shows what each budget costs
    target_bitwidth: Any = 4.0
    # more budgets to report the best plan at (selection/<kind>_budgets.csv): average bits (4.5) or bytes with a
    # unit ("750KB", "1.5MiB"); each is also a point of a full sweep
    budgets: list[Any] = field(default_factory=list)
    # the candidates the program may give each group's layers: bits of quant.bits, and (weights) names of
    # quant.weight_formats (e.g. [2, 4, 8, nf12, nf24])
    bits_content: list[Any] = field(default_factory=lambda: [2, 4, 8])
    bits_quality: list[Any] = field(default_factory=lambda: [4, 8])
    # search.sweep=full: budgets under these groups' fewest bits are solved with every candidate bit allowed in both
    # groups, so the family reaches uniform-W2 bytes (above, the groups' bits hold: W2 on quality layers, allowed
    # everywhere, made the 3.5-4.5-bit plans 2-15x worse on the embedded model)
    every_bit_below: bool = True
    # mpq mode: more candidate sets, each swept on its own over its range (both groups keep their candidates in the
    # set); their plans join the family selection compares. With many candidates the program's summed scores can
    # miss a mix a narrower set finds (tiny-sdxl, widths 2-8: 2.7x worse at the uniform-W4 bytes than with 2/4/8)
    also: list[Any] = field(default_factory=list)
    k_min: float = 0.46  # K = avg bits content / avg bits quality, swept over linspace(k_min, k_max, k_num)
    k_max: float = 1.36
    k_num: int = 10


def _act_search() -> SearchKindConfig:
    return SearchKindConfig(
        target_bitwidth=AUTO,  # A7.5 (MixDQ's, and reference mode's auto) lost to A8 on both embedded models
        bits_content=[4, 8],
        bits_quality=[4, 8],
        k_min=0.94,
        k_max=1.09,
        k_num=20,
        every_bit_below=False,
    )


@dataclass
class SearchConfig:
    mode: str = "mpq"  # mpq: one program, budget in bytes | reference: MixDQ's two programs, avg-bit bands
    solver: str = "CBC"  # OR-Tools MIP backend (CBC or SCIP); solved to a relative MIP gap of 1e-6
    time_limit_s: float = 60.0  # per solve; a solve stopped by it is reported with its gap
    band: float = 0.02  # reference mode: +- around each group's average-bit share
    # full: budgets over the whole feasible range (the fewest to the most bits), one every sweep_density average
    # bits, plus the target and the named budgets | target: MixDQ's linspace(target - sweep_span, target, sweep_steps)
    sweep: str = "full"
    sweep_density: float = 0.25
    sweep_steps: int = 10
    sweep_span: float = 0.3
    # mpq mode: every uniform plan (each candidate on every layer both groups allow it on) joins the candidates
    # selection compares by images: the program's summed scores can miss the plan a user would pick by hand
    uniform: bool = True
    # mpq mode: the GGUF users' hand rule joins it too, for every pair of candidates: a base candidate, and one or
    # two candidates higher on the layers outside numbered blocks and on the first and last block
    edge_rules: bool = True
    scale_bytes: int = 2  # bytes per stored scale / zero point (fp16)
    fp_bytes: int | None = (
        None  # bytes per element of a layer kept in floating point; null: the model dtype's (fp32 4, fp16/bf16 2)
    )
    # MixDQ's act-protect rule: per group, the ceil(percent %) activation layers most damaged at act_protect_bit stay FP
    act_protect_percent: float = 1.0
    act_protect_bit: int = 8
    protect_weights: bool = False  # act-protected layers keep FP weights too (MixDQ's final inference does)
    weight: SearchKindConfig = field(default_factory=SearchKindConfig)
    act: SearchKindConfig = field(default_factory=_act_search)


@dataclass
class SelectConfig:
    num_images: int = 8  # selection images: the first N calibration prompts/seeds, scored against their FP images
    pareto_only: bool = False  # score only Pareto-optimal candidates (fewer generations on big sweeps)
    # weights, mpq mode: after scoring the family, a local search from the chosen plan within its budget (one-step
    # moves on each layer's candidate ladder, tried in the order the program's scores rank them, each scored by the
    # selection images' MSE; kept only when it improves): the program's summed per-layer scores miss how layers
    # compose. Objective evaluations (each one plan's selection images); 0: off
    refine_evals: int = 40
    refine_per_round: int = 8  # moves scored before the best of them is taken (if it improves)


@dataclass
class EvalConfig:
    # the report's evaluation prompts (MSE vs FP, adherence, images): a file or builtin: list; null: the calibration
    # prompts
    prompts_file: str | None = None
    num_images: int = 8  # the first N of them (image i uses seed sampling.seed + i)
    # a peer benchmark's results (benchmarks/bench_peers.py --out DIR writes DIR/peers.json): the report draws them
    peers: str | None = None


@dataclass
class MpqConfig:
    name: str = ""
    target: str = "mpq"  # mpq | sdnq: the runtime the plan is for (sets the weight candidates: see target_preset)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    groups: GroupsConfig = field(default_factory=GroupsConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str) -> float:
    """``'750KB'`` -> 750000.0 (units B, KB, MB, GB, KiB, MiB, GiB; case-insensitive)."""
    t = text.strip().upper().replace(" ", "")
    for unit in sorted(UNITS, key=len, reverse=True):
        if t.endswith(unit):
            try:
                return float(t[: -len(unit)]) * UNITS[unit]
            except ValueError:
                break
    raise MpqError(
        f"budget {text!r}: give average bits (a number, e.g. 4.5) or bytes with a unit (e.g. 750KB, 1.5MiB, 2GB)"
    )


# --------------------------------------------------------------------------- lookup
def config_root() -> Path:
    """The ``configs/`` tree: $MPQ_CONFIG_DIR, else the one beside the package."""
    env = os.environ.get("MPQ_CONFIG_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "configs"


def available_configs() -> list[str]:
    root = config_root()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml")) if root.is_dir() else []


def resolve_config_path(name_or_path: str) -> Path:
    """A path that exists, else a name (with or without ``.yaml``, with or without folder) under configs/."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p.resolve()
    root = config_root()
    name = name_or_path if name_or_path.endswith((".yaml", ".yml")) else f"{name_or_path}.yaml"
    direct = root / name
    if direct.is_file():
        return direct.resolve()
    hits = sorted(root.rglob(Path(name).name)) if root.is_dir() else []
    hits = [h for h in hits if str(h.relative_to(root)).endswith(name)]
    if len(hits) == 1:
        return hits[0].resolve()
    if len(hits) > 1:
        names = ", ".join(str(h.relative_to(root)) for h in hits)
        raise MpqError(f"config '{name_or_path}' is ambiguous: {names}; give the folder too")
    avail = ", ".join(available_configs()) or f"none (no configs under {root})"
    raise MpqError(f"unknown config '{name_or_path}'; available: {avail}; or give a path to a .yaml file")


# --------------------------------------------------------------------------- loading
def _compose(path: Path) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    root = config_root()
    shipped = sorted({p.parent for p in root.rglob("*.yaml")}) if root.is_dir() else []
    # a config's defaults are looked up beside it first, then among mpq's configs (a user config can build on them)
    search = [f"file://{d}" for d in shipped if d != path.parent]
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            return compose(
                config_name=path.stem, overrides=[f"hydra.searchpath=[{','.join(search)}]"] if search else []
            )
    except HydraException as err:
        first = str(err).strip().splitlines()[0]
        where = ", ".join([str(path.parent), *(str(d) for d in shipped if d != path.parent)])
        hint = f" (defaults are looked up in {where})" if "Could not" in first or "not found" in first else ""
        raise MpqError(f"config {path}: {first}{hint}") from None
    except yaml.YAMLError as err:
        raise MpqError(f"config {path}: not valid YAML{_where(err)}; fix the file") from None
    except UnicodeDecodeError:
        raise MpqError(f"config {path}: not a UTF-8 text file; save it as UTF-8 YAML") from None


def _where(err: Exception) -> str:
    mark = getattr(err, "problem_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _key_error(err: OmegaConfBaseException, source: str) -> MpqError:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).strip().splitlines()[0]
    if "not in" in msg or "Key '" in msg and "not" in msg:
        parent_key = key.rsplit(".", 1)[0] if "." in key else ""
        node: Any = OmegaConf.structured(MpqConfig)
        for part in parent_key.split(".") if parent_key else []:
            node = node.get(part) if isinstance(node, DictConfig) else None
        valid = ", ".join(node.keys()) if isinstance(node, DictConfig) else ""
        hint = f"; valid keys{' under ' + parent_key if parent_key else ''}: {valid}" if valid else ""
        return MpqError(f"unknown config key '{key}' in {source}{hint}")
    return MpqError(f"bad value for config key '{key}' in {source}: {msg}")


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Load a config by name or path, apply ``key=value`` overrides, validate."""
    path = resolve_config_path(name_or_path)
    raw = _compose(path)
    return build_config(raw, overrides, source=str(path), default_name=path.stem)


# keys that configs once had and that did nothing: a user's config naming one gets a one-line error saying so;
# a run directory's saved config.yaml (written by an older mpq) has them dropped
RETIRED = {
    "quant.weight.symmetric": "use quant.weight.levels: symmetric | asymmetric",
    "quant.act.granularity": "activations are always quantized per tensor (per input part)",
    "quant.act.scale_method": "activation ranges are always running min-max",
}


def _retire(raw: Any, source: str, drop: bool) -> Any:
    for key, why in RETIRED.items():
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(raw, parent) if isinstance(raw, DictConfig) else None
        if isinstance(node, DictConfig) and leaf in node:
            if not drop:
                raise MpqError(f"config key '{key}' in {source} no longer exists ({why}); delete it")
            with open_dict(node):
                del node[leaf]
    return raw


def build_config(
    raw: Any,
    overrides: list[str] | tuple[str, ...] = (),
    source: str = "config",
    default_name: str = "",
    saved: bool = False,
) -> DictConfig:
    """Merge a raw mapping onto the schema, then apply overrides and validate (``saved``: a run's own config.yaml)."""
    raw = _retire(raw, source, drop=saved)
    schema = OmegaConf.structured(MpqConfig)
    target = _target_of(raw, overrides)
    preset = target_preset(target)
    try:
        cfg = OmegaConf.merge(schema, preset, raw)
    except OmegaConfBaseException as err:
        raise _key_error(err, source) from None
    _runtime_candidates(cfg, preset, target)
    for item in overrides:
        if "=" not in item:
            raise MpqError(f"override '{item}' is not of the form key=value (e.g. quant.bits=[4,8])")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _key_error(err, f"override '{item}'") from None
        except yaml.YAMLError:
            key, _, value = item.partition("=")
            raise MpqError(
                f"override '{item}': the value {value!r} of {key} is not valid YAML (a bracket or quote unclosed?)"
            ) from None
    if not cfg.name:
        cfg.name = default_name or "run"
    validate(cfg)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def _target_of(raw: Any, overrides: Sequence[str]) -> str:
    """The ``target`` a config asks for (its last override, else the file's, else mpq)."""
    given = [o.partition("=")[2].strip() for o in overrides if o.partition("=")[0].strip() == "target"]
    target = given[-1] if given else (raw.get("target") if isinstance(raw, DictConfig) else None) or "mpq"
    if target not in choices.TARGETS:
        raise MpqError(f"config key 'target' is '{target}'; use one of: {', '.join(choices.TARGETS)}")
    return str(target)


def _runtime_candidates(cfg: DictConfig, preset: DictConfig, target: str) -> None:
    """A file's weight candidates that name none of a runtime target's formats (a pipeline config's integer
    widths) give way to the target's own; a list that names them wins over the preset (overrides come later)."""
    if "search" not in preset:
        return
    w, p = cfg.search.weight, preset.search.weight
    replaced = False
    for key in ("bits_content", "bits_quality"):
        if not any(str(b).startswith(f"{target}-") for b in w[key]):
            w[key] = list(p[key])
            w.every_bit_below = p.every_bit_below
            w.also = []
            replaced = True
    if replaced:  # the file's integer widths were weight candidates: keep only what the activations use
        a = cfg.search.act
        cfg.quant.bits = sorted({*a.bits_content, *a.bits_quality, cfg.search.act_protect_bit})


def target_preset(target: str) -> DictConfig:
    """What a target sets under a config (a key the config gives wins, but see :func:`_runtime_candidates`):
    ``sdnq`` (``gguf``) makes SDNQ's dtypes (ggml's types) the weight candidates of both groups
    (``quant.weight_formats``, ``search.weight.bits_content`` / ``bits_quality``), with no sweep below them (every
    plan must be storable by the runtime); ``gguf`` aims at 5 code bits a weight."""
    cands = list(choices.TARGETS[target])
    if not cands:
        return OmegaConf.create({})
    weight: dict[str, Any] = {"bits_content": cands, "bits_quality": cands, "every_bit_below": False}
    if target == "gguf":  # code bits between Q4's and Q8's (Q4_0 alone is 4): a mix, not uniform Q4_0
        weight["target_bitwidth"] = 5.0
    return OmegaConf.create({"quant": {"weight_formats": cands}, "search": {"weight": weight}})


def config_from_yaml_text(
    text: str, source: str, overrides: list[str] | tuple[str, ...] | Sequence[str] = ()
) -> DictConfig:
    """Rebuild a config saved in a run directory (already resolved), with ``key=value`` overrides."""

    try:
        raw = OmegaConf.create(text)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise MpqError(
            f"{source}: not a valid config ({str(err).splitlines()[0]}); fix it, or delete it and give --config"
        ) from None
    return build_config(raw, list(overrides), source=source, saved=True)


def _one_of(value: Any, allowed: tuple[Any, ...], key: str) -> None:
    if value not in allowed:
        raise MpqError(f"config key '{key}' is '{value}'; use one of: {', '.join(map(str, allowed))}")


def validate(cfg: DictConfig) -> None:
    _one_of(cfg.model.dtype, tuple(choices.DTYPES), "model.dtype")
    if not (cfg.model.device in ("auto", "cpu", "cuda", "mps") or str(cfg.model.device).startswith("cuda:")):
        raise MpqError(f"config key 'model.device' is '{cfg.model.device}'; use auto, cpu, cuda, cuda:N or mps")
    _one_of(cfg.sampling.scheduler, ("keep", *choices.SCHEDULERS), "sampling.scheduler")
    _one_of(cfg.sampling.timestep_spacing, choices.TIMESTEP_SPACINGS, "sampling.timestep_spacing")
    if cfg.sampling.guidance_scale < 0:
        raise MpqError(f"config key 'sampling.guidance_scale' is {cfg.sampling.guidance_scale}; use a value >= 0")
    msl = cfg.sampling.max_sequence_length
    if msl is not None and msl < 1:
        raise MpqError(f"config key 'sampling.max_sequence_length' is {msl}; use a positive token count or null")
    if cfg.sampling.steps < 1:
        raise MpqError("config key 'sampling.steps' must be >= 1")
    if cfg.sampling.resolution % 8 or cfg.sampling.resolution < 32:
        raise MpqError(f"config key 'sampling.resolution' is {cfg.sampling.resolution}; use a multiple of 8, >= 32")
    bits = list(cfg.quant.bits)
    if not bits or any(b < choices.MIN_BITS or b > choices.MAX_BITS for b in bits) or bits != sorted(set(bits)):
        raise MpqError(
            f"config key 'quant.bits' is {bits}; give distinct increasing bit-widths in "
            f"{choices.MIN_BITS}..{choices.MAX_BITS} (what the packed export "
            "stores), e.g. [2,4,8]"
        )
    _one_of(cfg.quant.weight.levels, choices.LEVELS, "quant.weight.levels")
    _one_of(cfg.quant.weight.granularity, choices.GRANULARITIES, "quant.weight.granularity")
    if cfg.quant.weight.group_size < 1:
        raise MpqError(f"config key 'quant.weight.group_size' is {cfg.quant.weight.group_size}; use e.g. 32, 64 or 128")
    _one_of(cfg.quant.weight.scale_method, choices.SCALE_METHODS, "quant.weight.scale_method")
    _one_of(cfg.quant.act.calibration, choices.ACT_CALIBRATIONS, "quant.act.calibration")
    if not 0.0 <= cfg.quant.act.momentum < 1.0:
        raise MpqError("config key 'quant.act.momentum' must be in [0, 1)")
    if not isinstance(cfg.quant.act.step_groups, int) or cfg.quant.act.step_groups < 1:
        raise MpqError(
            f"config key 'quant.act.step_groups' is {cfg.quant.act.step_groups!r}; use 1 (one activation range for "
            "all steps) or a larger integer (ranges per group of steps)"
        )
    if not 0.0 < cfg.quant.weight.mse_min_ratio <= 1.0:
        raise MpqError("config key 'quant.weight.mse_min_ratio' must be in (0, 1]")
    for key in ("sampling.batch_size", "calib.batch_size", "calib.num_samples", "infer.num_images", "eval.num_images"):
        if OmegaConf.select(cfg, key) < 1:
            raise MpqError(f"config key '{key}' must be >= 1")
    formats = weight_formats(cfg)
    for key, known in (("infer.weight_bits", [*bits, *formats]), ("infer.act_bits", bits)):
        b = OmegaConf.select(cfg, key)
        if isinstance(b, str) and key == "infer.weight_bits":
            b = _format_key(b, key)
        if b is not None and b not in known:
            raise MpqError(f"config key '{key}' is {b}; use one of the candidates {known} or null (FP)")
    _validate_search(cfg)
    _one_of(cfg.sensitivity.method, choices.METHODS, "sensitivity.method")
    _one_of(cfg.sensitivity.estimator, choices.ESTIMATORS, "sensitivity.estimator")
    if not 0.0 <= cfg.sensitivity.hybrid_fraction <= 1.0:
        raise MpqError("config key 'sensitivity.hybrid_fraction' must be within [0, 1]")
    _one_of(cfg.sensitivity.dtype, tuple(choices.DTYPES), "sensitivity.dtype")
    _one_of(cfg.sensitivity.ssim, choices.SSIM_KINDS, "sensitivity.ssim")
    if cfg.select.num_images < 1:
        raise MpqError("config key 'select.num_images' must be >= 1")
    if cfg.select.refine_evals < 0 or cfg.select.refine_per_round < 1:
        raise MpqError("config key select.refine_evals must be >= 0 (0: off) and select.refine_per_round >= 1")
    _one_of(cfg.sensitivity.share_bits, choices.SHARE_BITS, "sensitivity.share_bits")
    if cfg.sensitivity.num_images < 1 or cfg.sensitivity.batch_size < 1 or cfg.sensitivity.cache_budget_mb <= 0:
        raise MpqError(
            "config keys sensitivity.num_images, sensitivity.batch_size must be >= 1 and sensitivity.cache_budget_mb > "
            "0"
        )


def _format_key(value: Any, key: str) -> Any:
    # upward on purpose: weight-format names are a registry of classes in the model layer, asked, not copied
    from mpq.quant.formats import weight_key

    try:
        return weight_key(value)
    except MpqError as err:
        raise MpqError(f"config key '{key}': {err}") from None


def _format_runtime(value: Any, key: str) -> str:
    from mpq.quant.formats import resolve  # upward on purpose, as in _format_key

    return resolve(_format_key(value, key)).runtime


def _nominal_bits(key: Any) -> float:
    from mpq.quant.formats import nominal_bits  # upward on purpose, as in _format_key

    return nominal_bits(key)


def weight_formats(cfg: DictConfig) -> list[str]:
    """``quant.weight_formats`` as canonical names (one-line error for an unknown one or a repeat)."""
    names = [str(_format_key(f, "quant.weight_formats")) for f in cfg.quant.get("weight_formats", []) or []]
    if any(n.isdigit() for n in names):
        raise MpqError(
            f"config key 'quant.weight_formats' is {names}; integer bit-widths belong in quant.bits, formats here "
            "(e.g. [nf12, nf24])"
        )
    if len(set(names)) != len(names):
        raise MpqError(f"config key 'quant.weight_formats' is {names}; name each format once")
    return names


def _validate_search(cfg: DictConfig) -> None:
    s = cfg.search
    _one_of(s.mode, ("mpq", "reference"), "search.mode")
    _one_of(s.solver, ("CBC", "SCIP"), "search.solver")
    _one_of(s.sweep, ("full", "target"), "search.sweep")
    if not s.sweep_density > 0:
        raise MpqError(f"config key 'search.sweep_density' is {s.sweep_density}; use a positive step in average bits")
    for kind in ("weight", "act"):
        t = s[kind].target_bitwidth
        if t != AUTO and (isinstance(t, bool) or not isinstance(t, (int, float))):
            raise MpqError(
                f"config key 'search.{kind}.target_bitwidth' is {t!r}; use average bits (e.g. 4.0) or {AUTO}"
            )
        for b in s[kind].budgets:
            if isinstance(b, bool) or not isinstance(b, (int, float, str)):
                raise MpqError(f"config key 'search.{kind}.budgets' holds {b!r}; use average bits or bytes like 750KB")
            if isinstance(b, str):
                try:
                    parse_bytes(b)
                except MpqError as err:
                    raise MpqError(f"config key 'search.{kind}.budgets': {err}") from None
    if s.sweep_steps < 1 or s.sweep_span < 0 or s.band <= 0:
        raise MpqError("config keys search.sweep_steps >= 1, search.sweep_span >= 0 and search.band > 0 are required")
    if not 0.0 <= s.act_protect_percent < 100.0:
        raise MpqError("config key 'search.act_protect_percent' must be in [0, 100)")
    if s.act_protect_bit not in cfg.quant.bits:
        raise MpqError(
            f"config key 'search.act_protect_bit' is {s.act_protect_bit}; use one of the candidate bits "
            f"{list(cfg.quant.bits)}"
        )
    if cfg.target != "mpq":  # every weight plan must be one the target's runtime stores
        w, t = s.weight, cfg.target
        named = [(b, f"search.weight.{key}") for key in ("bits_content", "bits_quality") for b in w[key]]
        bad = [b for b, key in named if _format_runtime(b, key) != t]
        if bad or w.every_bit_below:
            raise MpqError(
                f"target {t} plans only {t}'s formats, but search.weight "
                + (f"names {sorted(set(map(str, bad)))}" if bad else "sweeps every integer width below them")
                + f": give {t}-<...> candidates in search.weight.bits_content / bits_quality and "
                "search.weight.every_bit_below=false (or leave them to the target)"
            )
    for kind in ("weight", "act"):
        k = s[kind]
        known = [*cfg.quant.bits, *(weight_formats(cfg) if kind == "weight" else [])]
        for key in ("bits_content", "bits_quality"):
            given = [_format_key(b, f"search.{kind}.{key}") if isinstance(b, str) else b for b in k[key]]
            bad = [b for b in given if b not in known]
            if bad or not k[key]:
                what = "quant.bits and quant.weight_formats" if kind == "weight" else "quant.bits"
                raise MpqError(
                    f"config key 'search.{kind}.{key}' is {list(k[key])}; use a non-empty subset of {what} {known}"
                )
        for subset in k.also:
            names = [_format_key(b, f"search.{kind}.also") if isinstance(b, str) else b for b in subset or []]
            if not names:  # a candidate not calibrated is left out when the set is swept (overriding quant.bits)
                raise MpqError(
                    f"config key 'search.{kind}.also' holds {subset!r}; give lists of candidates, e.g. [[2,4,8]]"
                )
        if k.k_num < 1 or k.k_min <= 0 or k.k_max < k.k_min:
            raise MpqError(f"config keys search.{kind}.k_min/k_max/k_num must give 0 < k_min <= k_max and k_num >= 1")
        # no plan averages fewer bits than the fewest candidate it may use: the groups' own, or below them every
        # integer bit (a full sweep with every_bit_below)
        named = [*k.bits_content, *k.bits_quality]
        pool = [*cfg.quant.bits, *named] if s.sweep == "full" and k.every_bit_below else named
        fewest = min(_nominal_bits(b) for b in pool)
        slack = float(s.band) if s.mode == "reference" else 0.0  # MixDQ's budget holds within the band
        if k.target_bitwidth == AUTO:
            continue
        if k.target_bitwidth + slack < fewest - 1e-9:
            raise MpqError(
                f"config key 'search.{kind}.target_bitwidth' is {k.target_bitwidth}; no {kind} plan averages fewer "
                f"than {fewest:g} bits (the fewest of its candidates {sorted(set(map(str, pool)))}): use a value >= "
                f"{fewest:g}"
            )


# keys added after runs were stamped, with the values that mean what mpq did before they existed: left out of stamps
# and signatures while they hold one of those, so a run made before them stays up to date
ADDED_UNSET: dict[str, tuple[Any, ...]] = {
    "sampling.max_sequence_length": (None,),
    "eval.peers": (None, []),
    "quant.weight_formats": (None, []),
    "quant.act.step_groups": (1,),
}


def settings(cfg: DictConfig, key: str) -> Any:
    """The resolved value of config section ``key`` as stamps and signatures record it (see ``ADDED_UNSET``)."""
    value = OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, key)}), resolve=True)["v"]
    for added, before in ADDED_UNSET.items():
        if added == key and value is None:  # a whole key that is unset (the section itself never is)
            return None
        if not added.startswith(key + "."):
            continue
        *path, leaf = added[len(key) + 1 :].split(".")
        node = value
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] in before:
            node.pop(leaf)
    return value


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
