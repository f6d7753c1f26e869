"""The PTQ checkpoint: quant params for every candidate bit, in one safetensors file.

Tensors are each layer's quant buffers (:mod:`mpq.quant.layers`), named
``<layer>::<buffer>``: ``qbits``, ``w_scale`` (bits, parts, C_out), ``a_scale`` /
``a_zero`` (bits, parts), ``a_range`` (parts, 2). The manifest (layers with
kind, shape, input split and BOS-awareness; candidate bits; quantizer settings;
model id and fingerprint) is stored in the file's metadata under
``mpq_manifest`` and copied beside it as ``ckpt.json`` for people to read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mpq.errors import MpqError
from mpq.files import load_tensors, read_tensor_metadata, save_tensors, write_json
from mpq.quant.model import QuantModel

FORMAT = "mpq-ckpt/2"  # 2: quant buffers per layer, input splits, BOS-aware layers


def manifest_for(qm: QuantModel, cfg: DictConfig) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model_id": cfg.model.id,
        "fingerprint": qm.fingerprint,
        "bits": qm.bits,
        "weight_quant": OmegaConf.to_container(cfg.quant.weight),
        "act_quant": OmegaConf.to_container(cfg.quant.act),
        "split_shortcut": bool(cfg.quant.split_shortcut),
        "layers": [
            {"name": name, "kind": "linear" if layer.weight.dim() == 2 else "conv", "shape": list(layer.weight.shape),
             "in_split": list(layer.in_split), "bos_aware": layer.bos_aware}
            for name, layer in qm.layers.items()
        ],
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
        raise MpqError(f"{path} has format {manifest.get('format')!r} (written by an older mpq), this mpq reads {FORMAT!r}; "
                       "re-run `mpq ptq --force`")
    return manifest


def load_checkpoint(path: str | Path, qm: QuantModel) -> dict[str, Any]:
    """Load quant params into ``qm``; a checkpoint of another model is a one-line error."""
    manifest = read_manifest(path)
    if manifest["fingerprint"] != qm.fingerprint:
        raise MpqError(
            f"{path} was calibrated for another model ({manifest['model_id']}, {len(manifest['layers'])} layers, "
            f"fingerprint {manifest['fingerprint']}) than the one loaded ({len(qm.layers)} layers, fingerprint {qm.fingerprint}); "
            "use the matching config or re-run `mpq ptq`"
        )
    layers = manifest["layers"]
    qm.prepare(manifest["bits"], bool(manifest["act_quant"]["symmetric"]), {entry["name"]: entry["in_split"] for entry in layers},
               [entry["name"] for entry in layers if entry["bos_aware"]])
    tensors = load_tensors(path)
    expected = set(qm.quant_state())
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors)) or sorted(set(tensors) - expected)
        raise MpqError(f"{path} does not hold the quant params this manifest describes (first mismatch: {missing[0]}); re-run `mpq ptq --force`")
    qm.load_quant_state(tensors)
    return manifest
