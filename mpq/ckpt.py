"""The PTQ checkpoint: quant params for every candidate bit, in one safetensors file.

Tensors are named ``<layer>::w_scale.<bits>``, ``<layer>::a_scale.<bits>``,
``<layer>::a_zero.<bits>``, ``<layer>::a_min``/``a_max`` (float32). The
manifest (layers, kinds, shapes, candidate bits, quantizer settings, model
id and fingerprint) is stored in the file's metadata under ``mpq_manifest``
and copied beside it as ``ckpt.json`` for people to read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mpq.errors import MpqError
from mpq.io import load_tensors, read_tensor_metadata, save_tensors, write_json
from mpq.quant.model import QuantModel, quantizable_modules

FORMAT = "mpq-ckpt/1"


def manifest_for(qm: QuantModel, cfg: DictConfig) -> dict[str, Any]:
    modules = quantizable_modules(qm.denoiser)
    return {
        "format": FORMAT,
        "model_id": cfg.model.id,
        "fingerprint": qm.fingerprint,
        "bits": list(cfg.quant.bits),
        "weight_quant": OmegaConf.to_container(cfg.quant.weight),
        "act_quant": OmegaConf.to_container(cfg.quant.act),
        "layers": [
            {"name": name, "kind": "linear" if m.weight.dim() == 2 else "conv", "shape": list(m.weight.shape)}
            for name, m in modules.items()
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
    manifest = json.loads(meta["mpq_manifest"])
    if manifest.get("format") != FORMAT:
        raise MpqError(f"{path} has format {manifest.get('format')!r}, this mpq reads {FORMAT!r}; re-run `mpq ptq`")
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
    qm.load_quant_state(load_tensors(path), a_symmetric=bool(manifest["act_quant"]["symmetric"]))
    return manifest
