"""``mpq export --format gguf``: a plan of ggml types as one ``.gguf`` denoiser file, in the original layout.

ComfyUI-GGUF, stable-diffusion.cpp and diffusers' ``from_single_file`` read a GGUF denoiser by the tensor names of
the checkpoint its authors published (:mod:`mpq.export.gguf_layout`), and keep the ggml type of each tensor. The
file holds:

- each planned layer's weight in its planned type, quantized by the ``gguf`` package (the simulated codes: a fused
  original tensor, e.g. SD3's ``qkv``, is its layers' rows in order, planned at one type by the search);
- every other weight of two or more dimensions (unplanned layers, convolutions, rows that are not whole blocks) in
  the floating point the cost model prices (F16 for ``fp_bytes`` 2, else F32), and biases, norms and embeddings
  (one dimension) in F32, as GGUF converters keep them;
- metadata: ``general.architecture`` as ComfyUI-GGUF names the family, the plan, the source model, the bits.

Beside it, the folder holds the rest of the pipeline (saved by diffusers, in ``fp_dtype``) and the denoiser's
``config.json``: diffusers loads the file with ``from_single_file(file, config=folder, subfolder=component,
quantization_config=GGUFQuantizationConfig(...))``; ``tensor_type_rules.txt`` is the stable-diffusion.cpp
``--tensor-type-rules`` string that makes the same file from the original checkpoint.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpq.errors import MpqError
from mpq.export.gguf_layout import UNET_PREFIX, Original, architecture, check_roundtrip, layout
from mpq.export.runtime import cast_others, runtime_plan
from mpq.plan import BitPlan
from mpq.quant.formats import Key
from mpq.quant.formats.gguf import GgufFormat, gguf_quants

# the written types diffusers' GGUF loader dequantizes (it also reads K-quants and IQ4, which gguf cannot write)
DIFFUSERS_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
FLOAT = ("f16", "f32")


def gguf_plan(plan: Mapping[str, Key]) -> dict[str, GgufFormat]:
    """{module path: format} of a weight plan; a one-line error for a format a GGUF file does not store."""
    return runtime_plan(plan, GgufFormat, "a GGUF file", "gguf", "gguf-<type>")


def tensor_types(
    originals: list[Original], params: Mapping[str, torch.Tensor], layers: Mapping[str, GgufFormat], fp: str
) -> dict[str, str]:
    """The ggml type of each original tensor: the planned type, ``fp`` (f16|f32) for other weights, f32 for 1-D."""
    types: dict[str, str] = {}
    for o in originals:
        paths = o.layers
        given = [layers[p].name if p in layers else "FP" for p in paths]
        shape = o.shape(params)
        if len(set(given)) > 1:
            raise MpqError(
                f"layers {', '.join(paths)} are one tensor ({o.name}) in the file, planned at {', '.join(given)}: a "
                "GGUF file stores it in one type; plan them alike (a search with GGUF candidates does)"
            )
        planned = given and given[0] != "FP"
        if planned and layers[paths[0]].stores(shape):
            types[o.name] = layers[paths[0]].qtype
        else:
            types[o.name] = fp if len(shape) >= 2 else "f32"
    return types


def tensor_type_rules(types: Mapping[str, str], matrices: set[str]) -> str:
    """stable-diffusion.cpp's ``--tensor-type-rules``: one exact rule a weight of two or more dimensions
    (``matrices``), in its ``model.diffusion_model.`` name, then every other tensor of the denoiser F32 (the first
    rule that matches a tensor gives its type; the text encoders and VAE keep the command's ``--type``).
    stable-diffusion.cpp's converter itself never converts some tensors, whatever the rules (biases, embeddings,
    the time/label embeddings, Flux's and SD3's input and output layers): those keep the source's type there."""
    rules = []
    for name, qtype in types.items():
        if name in matrices:
            full = name if name.startswith(UNET_PREFIX) else UNET_PREFIX + name
            rules.append(f"^{re.escape(full)}$={qtype}")
    return ",".join([*rules, f"^{re.escape(UNET_PREFIX)}=f32"])


def write_gguf(
    path: Path,
    originals: list[Original],
    params: Mapping[str, torch.Tensor],
    types: Mapping[str, str],
    metadata: Mapping[str, str | float | int],
    arch: str,
) -> dict[str, int]:
    """Write the tensors (quantized by the gguf package) and metadata; bytes a tensor takes in the file."""
    import gguf

    quants, ggml = gguf_quants()
    writer = gguf.GGUFWriter(str(path), arch, use_temp_file=True)  # tensors spill to disk, not all in memory
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint64(key, value)
        else:
            writer.add_float64(key, float(value))
    stored: dict[str, int] = {}
    for o in originals:
        t = o.tensor(params).detach().float().cpu().contiguous()
        qtype = ggml[types[o.name].upper()]
        if types[o.name] in ("f16", "f32"):
            data = t.numpy().astype(np.float16 if types[o.name] == "f16" else np.float32)
            writer.add_tensor(o.name, data)
        else:
            data = quants.quantize(t.numpy(), qtype)
            writer.add_tensor(o.name, data, raw_dtype=qtype)
        stored[o.name] = int(data.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def file_name(model_id: str, avg_bits: float) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", model_id.split(":")[-1].rstrip("/").split("/")[-1]).strip("-") or "model"
    return f"{stem}-mpq-{avg_bits:.2f}bpw.gguf"


def export_gguf(cfg: Any, plan: BitPlan, folder: Path, fp_dtype: torch.dtype, fp_bytes: int) -> dict[str, Any]:
    """Write the pipeline folder with the plan's ``.gguf`` denoiser into ``folder`` (made and moved into place by
    :func:`mpq.export.folder.export_folder`)."""
    from mpq.families import family_of
    from mpq.models import denoiser_name, denoiser_of, load_pipeline
    from mpq.models.loader import absent_components

    layers = gguf_plan(plan.weight)
    pipe = load_pipeline(cfg, dtype=torch.float32)
    component = denoiser_name(pipe.components)
    den = denoiser_of(pipe)
    family = family_of(den).name
    params = {k: v.detach() for k, v in den.state_dict().items()}
    originals = layout(family, list(params), den.config)
    verified = _verify(family, originals, params, den.config)
    types = tensor_types(originals, params, layers, "f16" if fp_bytes == 2 else "f32")
    quantized = {o.name: GgufFormat(types[o.name]) for o in originals if types[o.name] not in FLOAT}
    numel = {o.name: math.prod(o.shape(params)) for o in originals if o.name in quantized}
    code_bytes = sum(numel[n] // f.block[0] * f.block[1] for n, f in quantized.items())
    avg_bits = 8.0 * code_bytes / max(sum(numel.values()), 1)
    name = file_name(str(cfg.model.id), avg_bits)
    meta = {
        "general.name": f"{cfg.model.id} (mpq plan, {avg_bits:.2f} bits a quantized weight)",
        "general.type": "model",
        "mpq.source.model_id": str(cfg.model.id),
        "mpq.plan.weight": json.dumps({n: str(k) for n, k in plan.weight.items()}),
        "mpq.family": family,
        "mpq.component": component,
    }
    stored = write_gguf(folder / name, originals, params, types, meta, architecture(family, den.config))
    rules = tensor_type_rules(types, {o.name for o in originals if len(o.shape(params)) >= 2})
    (folder / "tensor_type_rules.txt").write_text(rules + "\n")
    cast_others(pipe, component, fp_dtype)
    setattr(pipe, component, None)  # the denoiser is the .gguf file; its config.json stays for from_single_file
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index[component] = [type(den).__module__.split(".")[0], type(den).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / component).mkdir(exist_ok=True)
    den.save_config(folder / component)
    holder = {path: o.name for o in originals for path in o.layers}
    kept_fp = sorted(p for p in layers if types[holder[p]] in FLOAT)
    holding = {holder[p] for p in layers}  # the tensors that hold the planned weights
    return {
        "file": name,
        "file_bytes": (folder / name).stat().st_size,
        "tensor_bytes": stored,
        "planned_bytes": sum(stored[n] for n in holding),
        "types": types,
        "layers": len(layers) - len(kept_fp),
        "kept_fp": kept_fp,
        "act_dropped": len(plan.act),
        "absent": sorted(absent_components(str(folder))),
        "component": component,
        "verified": verified,
        "rules": rules,
        "family": family,
        "cls": type(den).__name__,
        "not_in_diffusers": sorted({t for t in types.values() if t not in FLOAT and t not in DIFFUSERS_TYPES}),
    }


def _verify(family: str, originals: list[Original], params: Mapping[str, torch.Tensor], config: Any) -> str:
    """diffusers' converter gives the denoiser back from the layout (see :func:`check_roundtrip`); Flux's converter
    is written for Flux's width (3072) only, so a narrower Flux is checked by the name rules alone."""
    if family == "flux":
        width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        if width != 3072:
            return f"layout not run through diffusers' converter: it assumes Flux's width 3072, this model's is {width}"
    check_roundtrip(family, originals, params, config)
    return "diffusers' single-file converter gives back every parameter"
