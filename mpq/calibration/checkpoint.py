"""The PTQ checkpoint: quant params for every candidate bit, in one safetensors file, and the run's layer description.

Tensors are each layer's quant buffers (:mod:`mpq.quant.layers`), named
``<layer>::<buffer>``: ``qbits``, ``w_scale`` / ``w_offset`` (bits, rows, groups), ``a_scale`` /
``a_zero`` (bits, parts), ``a_range`` (parts, 2); with step groups (``act_quant.step_groups`` G > 1) also
``a_step_scale`` / ``a_step_zero`` (G, bits, parts), ``a_step_range`` (G, parts, 2), ``a_step_bounds`` (G - 1,).
The manifest (every layer's
:class:`~mpq.layers.LayerInfo`: kind, shape, input split, BOS-awareness, input
size; candidate bits; quantizer settings; model id and fingerprint) is stored
in the file's metadata under ``mpq_manifest`` and copied beside it as
``ckpt.json`` for people to read. Every stage after PTQ learns the layers from
it (:func:`run_layers`) and loads the quantized model with
:func:`quantized_pipeline`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mpq.errors import MpqError
from mpq.families import family_of
from mpq.layers import LayerInfo, assign_groups, content_patterns, describe
from mpq.models import denoiser_of, pipeline_in, torch_dtype
from mpq.quant.model import QuantModel, same_weights, weights_sample
from mpq.quant.quantizer import WeightQuant
from mpq.quant.structure import Structure
from mpq.runner.files import load_tensors, read_tensor_metadata, save_tensors, write_json
from mpq.runner.rundir import RunDir

# 2: quant buffers per layer, input splits, BOS-aware layers; 3: each layer's input size; 4: weight scales and
# offsets per (row, group) of the configured weight quantizer
FORMAT = "mpq-ckpt/4"


def manifest_for(qm: QuantModel, cfg: DictConfig) -> dict[str, Any]:
    extra = {"weight_formats": qm.formats} if qm.formats else {}  # absent: integer bits only (as before formats)
    return {
        "format": FORMAT,
        "model_id": cfg.model.id,
        "fingerprint": qm.fingerprint,
        "family": family_of(qm.denoiser).name,
        "weights_sample": weights_sample(qm.denoiser),
        "bits": qm.bits,
        "weight_quant": OmegaConf.to_container(cfg.quant.weight),
        "act_quant": OmegaConf.to_container(cfg.quant.act),
        "split_shortcut": bool(cfg.quant.split_shortcut),
        "layers": [info.manifest_entry() for info in describe(qm, [], warn=False)],
        **extra,
    }


def save_checkpoint(path: str | Path, qm: QuantModel, cfg: DictConfig) -> dict[str, Any]:
    manifest = manifest_for(qm, cfg)
    save_tensors(path, qm.quant_state(), metadata={"mpq_manifest": json.dumps(manifest)})
    write_json(Path(path).with_suffix(".json"), manifest)
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    meta = read_tensor_metadata(path)
    if "mpq_manifest" not in meta:
        raise MpqError(f"{path} is not an mpq checkpoint (no manifest); re-run `mpq ptq`")
    try:
        manifest = json.loads(meta["mpq_manifest"])
    except json.JSONDecodeError:
        raise MpqError(f"{path} has a corrupt manifest; delete it and re-run `mpq ptq`") from None
    if manifest.get("format") != FORMAT:
        raise MpqError(
            f"{path} has format {manifest.get('format')!r} (written by an older mpq), this mpq reads {FORMAT!r}; "
            "re-run `mpq ptq --force`"
        )
    return manifest


def manifest_formats(manifest: dict[str, Any], path: str | Path = "checkpoint") -> list[str]:
    """The weight formats a checkpoint calibrated besides its integer bits ([] when none)."""
    from mpq.quant.formats import parse_format

    names = manifest.get("weight_formats", [])
    try:
        return [parse_format(n).name for n in names]
    except MpqError as err:
        raise MpqError(f"{path}: {err}; re-run `mpq ptq --force`") from None


def weight_candidates(manifest: dict[str, Any]) -> list[Any]:
    """Every weight candidate of a checkpoint: its integer bits, then its formats."""
    return [*manifest["bits"], *manifest_formats(manifest)]


def load_checkpoint(path: str | Path, qm: QuantModel) -> dict[str, Any]:
    """Load quant params into ``qm``; a checkpoint of another model is a one-line error."""
    manifest = read_manifest(path)
    if manifest["fingerprint"] != qm.fingerprint:
        raise MpqError(
            f"{path} was calibrated for another model ({manifest['model_id']}, {len(manifest['layers'])} layers, "
            f"fingerprint {manifest['fingerprint']}) than the one loaded ({len(qm.layers)} layers, fingerprint "
            f"{qm.fingerprint}); "
            "use the matching config or re-run `mpq ptq`"
        )
    if not same_weights(manifest.get("weights_sample"), weights_sample(qm.denoiser)):
        raise MpqError(
            f"{path} was calibrated on other weights than the model loaded ({manifest['model_id']} there; the same "
            "architecture with other values: another checkpoint or a fine-tune); re-run `mpq ptq --force`"
        )
    layers = [LayerInfo.from_manifest(entry, "") for entry in manifest["layers"]]
    qm.prepare(
        manifest["bits"],
        bool(manifest["act_quant"]["symmetric"]),
        Structure(
            {i.name: i.act_numel for i in layers},
            {i.name: i.in_split for i in layers},
            {i.name for i in layers if i.bos_aware},
        ),
        WeightQuant.from_config(manifest["weight_quant"]),
        manifest_formats(manifest, path),
        [0.0] * (int(manifest["act_quant"].get("step_groups", 1)) - 1),  # the boundaries load with the tensors
    )
    tensors = load_tensors(path)
    expected = set(qm.quant_state())
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors)) or sorted(set(tensors) - expected)
        raise MpqError(
            f"{path} does not hold the quant params this manifest describes (first mismatch: {missing[0]}); re-run "
            "`mpq ptq --force`"
        )
    qm.load_quant_state(tensors)
    return manifest


def run_layers(cfg: DictConfig, run: RunDir) -> list[LayerInfo]:
    """The run's layer description (from its checkpoint's manifest), grouped by ``groups.content`` (default: the
    family's content group)."""
    manifest = read_manifest(run.require(run.ckpt, f"run `mpq ptq --base_path {run.root}` first"))
    patterns = content_patterns(cfg, manifest.get("family", "unet"))
    groups = assign_groups([e["name"] for e in manifest["layers"]], patterns)
    return [LayerInfo.from_manifest(e, groups[e["name"]]) for e in manifest["layers"]]


def quantized_pipeline(
    cfg: DictConfig, run: RunDir, pipe: Any | None = None, dtype: torch.dtype | None = None
) -> tuple[Any, QuantModel, dict[str, Any]]:
    """The run's pipeline (in ``dtype``, default ``model.dtype``) with its denoiser wrapped and the checkpoint
    loaded (FP until a plan is applied); ``pipe`` is reused when it computes in that dtype."""
    run.require(run.ckpt, f"run `mpq ptq --base_path {run.root}` first")
    pipe = pipeline_in(cfg, dtype or torch_dtype(cfg.model.dtype), pipe)
    qm = QuantModel(denoiser_of(pipe))
    manifest = load_checkpoint(run.ckpt, qm)
    return pipe, qm, manifest
