"""The ``mpq`` export format: a diffusers pipeline folder whose denoiser holds packed low-bit weights.

Layout (what ``DiffusionPipeline.save_pretrained`` writes, the denoiser replaced)::

    OUT/model_index.json, scheduler/, tokenizer*/, text_encoder*/, vae/   (FP, ``fp_dtype``)
    OUT/<denoiser>/config.json                the denoiser config + "quantization_config"
    OUT/<denoiser>/diffusion_pytorch_model.safetensors      (<denoiser>: unet or transformer)
        <layer>.qweight  uint8, packed (2-bit: 4 a byte, 4-bit: 2 a byte, 8-bit: 1 a byte)
        <layer>.w_scale  fp32 (rows, groups)      <layer>.a_scale / a_zero  fp32 (n_parts,)
        <layer>.a_step_scale / a_step_zero fp32 (G, n_parts), a_step_bounds fp32 (G - 1,)   with step groups only
        <layer>.w_offset fp32 (rows, groups)      asymmetric weight levels only (codes stored minus 2^(b-1))
        <layer>.bos_in / bos_out  fp32           cached FP row of a BOS-aware text layer's constant first token
        everything else (FP layers, norms, biases, buffers made at construction) in ``fp_dtype``

``quantization_config`` (``quant_method: mpq``) lists every quantized layer's
spec (:class:`~mpq.export.packed.PackedSpec`), the plan's act-protected
layers, the source model and a hash of every other file of the folder
(``components``). :func:`load_quantized` builds the denoiser on the meta device, swaps
in :class:`~mpq.export.packed.PackedLayer` modules and assigns the stored
tensors, so only packed bytes are ever resident.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from mpq.errors import MpqError
from mpq.export.packed import NON_WEIGHT, PackedLayer, PackedSpec
from mpq.models import denoiser_name
from mpq.plan import BitPlan
from mpq.quant.formats import Key
from mpq.quant.layers import QuantLayer
from mpq.quant.model import PREFIX, QuantModel
from mpq.quant.steps import attach, grouped
from mpq.runner.files import file_digest, load_tensors, read_tensor_metadata, save_tensors, write_json

# 2: 3/5/6/7-bit codes in a dense bit stream (1 stored them one a byte); 3: grouped scales, asymmetric levels;
# 4: every other component's files hashed too (``components`` in the quantization_config)
FORMAT = "mpq-packed/4"
# readable through :func:`older_tensors` (MixDQ's symmetric per-channel scales only): the shim is removed in mpq 0.3
OLDER = ("mpq-packed/1", "mpq-packed/2")
READABLE = (FORMAT, "mpq-packed/3", *OLDER)
# what each version writes, so a missing one is damage, not age: the denoiser's tensor hash and layer specs (from 3),
# the other components' file hashes (from 4)
TENSOR_HASHED = (FORMAT, "mpq-packed/3")
COMPONENTS_HASHED = (FORMAT,)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


# ----------------------------------------------------------------------------- denoiser tensors (pure)
def layer_spec(layer: QuantLayer, w_bits: Key | None, a_bits: int | None, bos_cached: bool) -> PackedSpec:
    conv = {}
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise MpqError(
                f"conv layer with padding {layer.padding!r}/{layer.padding_mode} cannot be exported; only numeric zero "
                "padding"
            )
        conv = {
            "stride": list(layer.stride),
            "padding": list(layer.padding),
            "dilation": list(layer.dilation),
            "groups": layer.groups,
        }
    return PackedSpec(
        "conv" if conv else "linear",
        tuple(layer.weight.shape),
        w_bits,
        a_bits,
        tuple(layer.in_split),
        layer.bos_aware,
        bos_cached and w_bits is not None and layer.bos_aware,
        layer.a_symmetric,
        layer.bias is not None,
        conv,
        layer.wq.as_dict(),
        layer.step_groups if a_bits is not None else 1,
    )


def packed_tensors(
    layer: QuantLayer, spec: PackedSpec, fp_dtype: torch.dtype, bos: tuple[torch.Tensor, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """One layer's exported tensors (names relative to the layer)."""
    out: dict[str, torch.Tensor] = {}
    if spec.w_bits is None:
        out["weight"] = layer.weight.detach().to(fp_dtype)
    else:  # its format's packed codes and parameters (``w_scale`` / ``w_offset``, ``wf_*``: the format names them)
        fmt = layer.weight_format(spec.w_bits)
        params = layer.format_params(fmt)
        out["qweight"] = fmt.pack(fmt.codes(layer.weight.detach(), params, layer.in_split))
        out.update(fmt.export_params(params))
    if spec.bos_cached:
        if bos is None:
            raise ValueError("a BOS-cached layer needs its (bos_in, bos_out)")
        out["bos_in"], out["bos_out"] = bos[0].float(), bos[1].float()
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().to(fp_dtype)
    if spec.a_bits is not None:
        k = layer.bits.index(spec.a_bits)
        out["a_scale"], out["a_zero"] = (
            layer.a_scale[k].detach().float().clone(),
            layer.a_zero[k].detach().float().clone(),
        )
        if spec.step_groups > 1:  # the bit's scale and zero point per step group, and the groups' boundaries
            out["a_step_scale"] = layer.a_step_scale[:, k].detach().float().clone()
            out["a_step_zero"] = layer.a_step_zero[:, k].detach().float().clone()
            out["a_step_bounds"] = layer.a_step_bounds.detach().float().clone()
    return out


def denoiser_export(
    qm: QuantModel,
    plan: BitPlan,
    fp_dtype: torch.dtype = torch.float16,
    bos_rows: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, quantization_config) of the denoiser under ``plan``: quantized layers packed, the rest in ``fp_dtype``.

    ``bos_rows``: for BOS-aware layers, the (prompt-independent) BOS input row; its FP output is cached."""
    bos_rows = bos_rows or {}
    specs: dict[str, PackedSpec] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in qm.layers.items():
        w, a = plan.weight.get(name), plan.act.get(name)
        if w is None and a is None:
            continue
        path = name[len(PREFIX) :]
        spec = specs[path] = layer_spec(layer, w, a, name in bos_rows)
        bos = None
        if spec.bos_cached:
            row = bos_rows[name].float()
            bos = (row, layer._op(row.reshape(1, 1, -1).to(layer.weight.dtype), layer.weight).reshape(-1).detach())
        tensors.update({f"{path}.{k}": t.contiguous() for k, t in packed_tensors(layer, spec, fp_dtype, bos).items()})
    calibration = {f"{n[len(PREFIX) :]}.{k}" for n, layer in qm.layers.items() for k in layer.quant_state()}
    for key, t in qm.denoiser.state_dict().items():
        if key.rpartition(".")[0] in specs or key in calibration:  # exported above / the PTQ checkpoint's buffers
            continue
        tensors[key] = (t.detach().to(fp_dtype) if t.is_floating_point() else t.detach()).contiguous()
    for key, t in non_persistent_buffers(qm.denoiser).items():  # e.g. PixArt's position table: made at init
        tensors[key] = (t.detach().to(fp_dtype) if t.is_floating_point() else t.detach()).contiguous()
    config = {
        "quant_method": "mpq",
        "format": FORMAT,
        "fp_dtype": str(fp_dtype).removeprefix("torch."),
        "layers": {p: s.as_dict() for p, s in specs.items()},
        "act_protected": sorted(n[len(PREFIX) :] for n in plan.protected),
    }
    return tensors, config


def serialized_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of ``tensors`` as one safetensors file: exactly the file :func:`export_mpq` writes (serialized in
    memory) up to 256 MiB of tensors; above, their bytes plus the JSON header as safetensors lays it out
    (offsets in name order: within a few bytes)."""
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    if data <= 2**28:
        return len(safetensors_bytes({k: v.cpu() for k, v in tensors.items()}, metadata={"format": "pt"}))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k in sorted(tensors):
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {
            "dtype": _ST_DTYPES.get(t.dtype, "F32"),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    return 8 + len(text) + (-len(text)) % 8 + data


_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.uint8: "U8",
    torch.int64: "I64",
    torch.int8: "I8",
}


def weight_bytes_of(tensors: Mapping[str, torch.Tensor], layer_paths: list[str]) -> int:
    """Bytes of the quantizable layers' weights in an export (packed codes and the format's parameters, or the FP
    weight: every tensor of the layer but its bias and activation / BOS tensors): the quantity the cost model
    prices."""
    paths = set(layer_paths)
    total = 0
    for key, t in tensors.items():
        owner, _, leaf = key.rpartition(".")
        if owner in paths and leaf not in NON_WEIGHT:
            total += t.numel() * t.element_size()
    return total


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers a module keeps out of its state dict (computed at construction, such as a position table): a model
    built on the meta device lacks them, so the export stores them."""
    return {
        f"{path}.{leaf}" if path else leaf: t
        for path, m in model.named_modules()
        for leaf, t in m._buffers.items()
        if t is not None and leaf in m._non_persistent_buffers_set
    }


# ----------------------------------------------------------------------------- BOS rows
def capture_bos_rows(pipe: Any, qm: QuantModel, cfg: Any) -> dict[str, torch.Tensor]:
    """The BOS input row of every BOS-aware layer, when it is the same for different prompts (causal text
    encoders): run the FP pipeline on two prompts and compare. Layers where it differs get no cache."""
    from mpq.images import generate

    names = [n for n, layer in qm.layers.items() if layer.bos_aware]
    if not names:
        return {}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [
        qm.layers[n].register_forward_pre_hook(
            lambda m, args, n=n: rows[n].append(args[0][:, 0].detach().clone()) if args[0].dim() == 3 else None
        )
        for n in names
    ]
    qm.set_fp()
    try:
        generate(
            pipe,
            ["a photo", "two red circles on a blue background, small"],
            [0, 1],
            cfg,
            batch_size=2,
            output_type="np",
        )
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, seen in rows.items():
        if not seen:
            continue
        stacked = torch.cat(seen)
        stacked = stacked[stacked.abs().amax(dim=-1) > 0]  # all-zero rows (a zeroed negative prompt): exact anyway
        if len(stacked) and torch.equal(stacked, stacked[:1].expand_as(stacked)):
            out[n] = stacked[0]
    return out


# ----------------------------------------------------------------------------- folder
def _save_component(module: Any, folder: Path, fp_dtype: torch.dtype) -> None:
    """``save_pretrained`` in ``fp_dtype`` (a cast copy: the caller's pipeline is left as it was)."""
    if isinstance(module, nn.Module) and any(
        p.is_floating_point() and p.dtype != fp_dtype for p in module.parameters()
    ):
        module = copy.deepcopy(module).to(fp_dtype)
    module.save_pretrained(folder)


def export_mpq(
    pipe: Any,
    qm: QuantModel,
    plan: BitPlan,
    folder: Path,
    cfg: Any,
    fp_dtype: torch.dtype = torch.float16,
    component: str = "unet",
) -> dict[str, Any]:
    """Write the ``mpq`` format into ``folder`` (:func:`mpq.export.folder.export_folder` makes it and moves it into
    place): the pipeline's other components in ``fp_dtype`` (their files hashed in the denoiser's config), the
    denoiser packed, its tensors and its layer specs checksummed in the weights file's metadata."""
    bos_rows = capture_bos_rows(pipe, qm, cfg)
    tensors, qconfig = denoiser_export(qm, plan, fp_dtype, bos_rows)
    qconfig["source"] = {"model_id": str(cfg.model.id), "fingerprint": qm.fingerprint}
    pipe.save_config(folder)
    for name, module in pipe.components.items():
        if name == component or module is None or not hasattr(module, "save_pretrained"):
            continue
        _save_component(module, folder / name, fp_dtype)
    qconfig["components"] = component_hashes(folder, component)
    den = folder / component
    den.mkdir()
    config = json.loads(qm.denoiser.to_json_string())
    config["quantization_config"] = qconfig
    write_json(den / "config.json", config)
    save_tensors(den / WEIGHTS_NAME, tensors, metadata=integrity_metadata(tensors, qconfig))
    from mpq.models.loader import absent_components

    return {
        "denoiser_bytes": (den / WEIGHTS_NAME).stat().st_size,
        "layers": len(qconfig["layers"]),
        "bos_cached": len(bos_rows),
        "absent": sorted(absent_components(str(folder))),  # diffusers' from_pretrained needs them passed as None
    }


# ----------------------------------------------------------------------------- integrity
def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A hash of every tensor's name, dtype, shape and bytes (sorted by name)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def integrity_metadata(tensors: Mapping[str, torch.Tensor], qconfig: Mapping[str, Any]) -> dict[str, str]:
    """The weights file's metadata: its tensors' hash, and the layer specs as exported (to name an edited field)."""
    return {
        "format": "pt",
        "mpq_sha256": tensors_digest(tensors),
        "mpq_layers": json.dumps(qconfig["layers"], sort_keys=True),
    }


def component_hashes(folder: Path, denoiser: str) -> dict[str, str]:
    """{path relative to the pipeline folder: content hash} of every file of the export but the denoiser's own
    (its tensors are hashed in its weights file, its config holds this mapping) and the export's marker."""
    from mpq.export.folder import MARKER

    return {
        p.relative_to(folder).as_posix(): file_digest(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER and p.relative_to(folder).parts[0] != denoiser
    }


def verify_components(pipeline: Path, qconfig: Mapping[str, Any], cfg_path: Path) -> None:
    """One-line errors for a component file of the export that is damaged, changed or gone (``pipeline``: the folder
    holding the denoiser's folder). A denoiser folder copied out on its own (no model_index.json beside it) has only
    itself to check."""
    if not (pipeline / "model_index.json").is_file():
        return  # a denoiser folder on its own: its weights file's hash covers it
    hashes = qconfig.get("components")
    if qconfig.get("format") in COMPONENTS_HASHED and not isinstance(hashes, dict):
        raise MpqError(
            f"{cfg_path}: quantization_config has no 'components' hashes, which {qconfig.get('format')} writes; "
            "restore it or re-export with `mpq export`"
        )
    for rel, digest in (hashes or {}).items():
        path = pipeline / rel
        if not path.is_file():
            raise MpqError(f"{path} is missing from the export (its hash is listed); re-export with `mpq export`")
        if file_digest(path) != digest:
            raise MpqError(f"{path}: checksum mismatch (changed or damaged after export); re-export with `mpq export`")


def verify(
    weights: Path, cfg_path: Path, tensors: Mapping[str, torch.Tensor], layers: Mapping[str, Any], version: Any
) -> None:
    """One-line errors for a damaged weights file or a layer spec edited after export; a hash missing from a format
    ``version`` that writes one is damage (a re-saved file), not an older export."""
    meta = read_tensor_metadata(weights)
    missing = [k for k in ("mpq_sha256", "mpq_layers") if k not in meta]
    if missing and version in TENSOR_HASHED:
        raise MpqError(
            f"{weights}: its metadata lacks {missing[0]}, which {version} writes (re-saved without it?); re-export "
            "with `mpq export`"
        )
    if "mpq_sha256" not in meta:
        return  # exported before checksums: nothing to compare
    if tensors_digest(tensors) != meta["mpq_sha256"]:
        raise MpqError(f"{weights}: checksum mismatch (changed or damaged after export); re-export with `mpq export`")
    exported = json.loads(meta.get("mpq_layers", "{}"))
    for path in sorted(set(exported) | set(layers)):
        a, b = exported.get(path), layers.get(path)
        if a != b:
            field = next((k for k in sorted(set(a or {}) | set(b or {})) if (a or {}).get(k) != (b or {}).get(k)), "")
            raise MpqError(
                f"{cfg_path}: quantization_config layer '{path}' field '{field}' was changed after export "
                f"({(a or {}).get(field)!r} -> {(b or {}).get(field)!r}); restore it or re-export with `mpq export`"
            )


# ----------------------------------------------------------------------------- loading
def check_qconfig(qconfig: Any, cfg_path: Path) -> None:
    """One-line errors for a ``quantization_config`` this mpq cannot load (none or not mpq's, an older packing of
    odd widths, an unknown format)."""
    if not qconfig or qconfig.get("quant_method") != "mpq":
        raise MpqError(f"{cfg_path} has no mpq quantization_config; it is not an `mpq export --format mpq` folder")
    if not isinstance(qconfig.get("layers"), dict):
        raise MpqError(
            f"{cfg_path}: quantization_config has no 'layers' mapping (each quantized layer's spec); restore it or "
            "re-export with `mpq export`"
        )
    odd = [
        p
        for p, spec in qconfig.get("layers", {}).items()
        if isinstance(spec, dict) and spec.get("w_bits") in (3, 5, 6, 7)
    ]
    if qconfig.get("format") == "mpq-packed/1" and odd:
        raise MpqError(
            f"{cfg_path}: written by an older mpq, whose {len(odd)} 3/5/6/7-bit layers (first: {odd[0]}) this mpq "
            "packs differently; re-export with `mpq export`"
        )
    if qconfig.get("format") not in READABLE:
        raise MpqError(
            f"{cfg_path}: export format {qconfig.get('format')!r}, this mpq reads {FORMAT!r}; re-export with `mpq "
            "export`"
        )


def older_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An :data:`OLDER` export's tensors as this mpq reads them: per-channel scales were stored (n_parts, C_out), now
    (rows, groups). The one shim for older exports; removed in mpq 0.3."""
    return {k: t.t().contiguous() if k.endswith(".w_scale") else t for k, t in tensors.items()}


def install_packed_layers(model: nn.Module, qconfig: Mapping[str, Any], cfg_path: Path, weights: Path) -> None:
    """Swap ``model``'s quantized layers (``qconfig``'s, checked with :func:`check_qconfig`) for
    :class:`~mpq.export.packed.PackedLayer` modules and assign every tensor of ``weights`` (checksums verified
    first; strict). ``model`` is built without weights (on the meta device); its floating tensors keep the file's
    dtypes (:func:`_cast` sets the compute dtype)."""
    verify_components(weights.parent.parent, qconfig, cfg_path)
    tensors = load_tensors(weights)
    verify(weights, cfg_path, tensors, qconfig["layers"], qconfig.get("format"))
    if qconfig.get("format") in OLDER:
        tensors = older_tensors(tensors)
    for path, spec_dict in qconfig["layers"].items():
        parent, _, child = path.rpartition(".")
        spec = PackedSpec.from_dict(spec_dict, f"{cfg_path}: layer '{path}'")
        try:
            owner = model.get_submodule(parent) if parent else model
        except AttributeError:
            raise MpqError(
                f"{cfg_path}: layer '{path}' is not a module of {type(model).__name__}; re-export with `mpq export`"
            ) from None
        with torch.device("meta"):
            layer = PackedLayer(spec)
        setattr(owner, child, layer)
    extra = {k: t for k, t in tensors.items() if k in non_persistent_buffers(model)}
    try:
        model.load_state_dict({k: t for k, t in tensors.items() if k not in extra}, strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1][:200]
        raise MpqError(f"{weights} does not match its config ({first}); re-export with `mpq export`") from None
    for key, t in extra.items():
        owner, _, leaf = key.rpartition(".")
        (model.get_submodule(owner) if owner else model)._buffers[leaf] = t
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise MpqError(f"{weights} lacks tensor {left[0]}; re-export with `mpq export`")
    if any(grouped(m) for m in model.modules()):
        attach(model)  # each call's timestep picks the step-grouped activation ranges


def load_denoiser(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """The exported denoiser (``folder`` is the denoiser folder): packed layers stay packed in memory."""
    import diffusers

    folder = Path(folder)
    cfg_path, weights = folder / "config.json", folder / WEIGHTS_NAME
    if not cfg_path.is_file() or not weights.is_file():
        raise MpqError(
            f"{folder} is not an mpq export (needs config.json and {WEIGHTS_NAME}); write one with `mpq export`"
        )
    config = json.loads(cfg_path.read_text())
    qconfig = config.pop("quantization_config", None)
    check_qconfig(qconfig, cfg_path)
    cls = getattr(diffusers, config.get("_class_name", "UNet2DConditionModel"))
    with torch.device("meta"):
        model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    install_packed_layers(model, qconfig, cfg_path, weights)
    _cast(model, dtype)
    model.to(device)
    model.eval().requires_grad_(False)
    model.mpq_quantization_config = qconfig
    return model


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating tensors to ``dtype``, except the packed layers' quant params (:attr:`PackedLayer.keep_fp32`: exact
    dequantization in any dtype)."""
    for module in model.modules():
        keep = module.keep_fp32 if isinstance(module, PackedLayer) else frozenset()
        for store in (module._parameters, module._buffers):
            for leaf, t in store.items():
                if leaf in keep:
                    continue
                if t is not None and t.is_floating_point() and t.dtype != dtype:
                    store[leaf] = (
                        nn.Parameter(t.to(dtype), requires_grad=False) if isinstance(t, nn.Parameter) else t.to(dtype)
                    )


def load_quantized(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Any:
    """A diffusers pipeline from an ``mpq export`` folder; its denoiser's quantized layers keep packed weights
    in memory and unpack on the fly. ``dtype``: the compute dtype of everything else."""
    from diffusers import DiffusionPipeline

    from mpq.models.loader import absent_components, quiet_loading

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise MpqError(
            f"{folder} is not an exported pipeline folder (no model_index.json); write one with `mpq export --out "
            f"{folder}`"
        )
    name = denoiser_name(json.loads((folder / "model_index.json").read_text()))
    denoiser = load_denoiser(folder / name, dtype, device)
    quiet_loading()
    absent = absent_components(str(folder))  # components saved as absent (SD3 without T5)
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, **absent, **{name: denoiser})
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tensor_bytes(module: nn.Module) -> int:
    """Resident bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


__all__ = [
    "FORMAT",
    "capture_bos_rows",
    "denoiser_export",
    "export_mpq",
    "load_denoiser",
    "load_quantized",
    "serialized_bytes",
    "tensor_bytes",
    "weight_bytes_of",
]
