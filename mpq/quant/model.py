"""QuantModel: wraps the denoiser's Linear/Conv2d layers, lists them, applies plans.

Layers are discovered by module type (never by SDXL names); a layer's name
is ``model.`` + its module path, as in the MixDQ files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mpq.groups import assign_groups
from mpq.quant.layers import QuantConv2d, QuantLayer, QuantLinear

PREFIX = "model."


@dataclass(frozen=True)
class LayerInfo:
    """What the search needs to know about one quantizable layer."""

    name: str
    kind: str  # linear | conv
    group: str  # content | quality
    weight_numel: int  # bias excluded
    act_numel: int  # input activation elements for one sample at the config's resolution
    out_channels: int

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def quantizable_modules(denoiser: nn.Module) -> dict[str, nn.Module]:
    """{``model.<path>``: module} for every Linear and Conv2d, in module order."""
    return {PREFIX + path: m for path, m in denoiser.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def example_inputs(arch: Mapping[str, Any], resolution: int, batch: int = 1, device: str | torch.device = "meta") -> dict[str, Any]:
    """Denoiser kwargs of the right shapes for one call at ``resolution`` px."""
    cfg = arch["unet"]
    side = resolution // arch["vae_scale_factor"]
    cross = cfg["cross_attention_dim"]
    cross = cross if isinstance(cross, int) else cross[0]
    kwargs: dict[str, Any] = {
        "sample": torch.zeros(batch, cfg.get("in_channels", 4), side, side, device=device),
        "timestep": torch.full((batch,), 999, device=device),
        "encoder_hidden_states": torch.zeros(batch, arch["text_max_length"], cross, device=device),
    }
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(batch, pooled, device=device),
            "time_ids": torch.zeros(batch, 6, device=device),
        }
    return kwargs


def input_numels(denoiser: nn.Module, inputs: Mapping[str, Any]) -> dict[str, int]:
    """Per-sample element count of each quantizable layer's input, from one forward."""
    batch = inputs["sample"].shape[0]
    sizes: dict[str, int] = {}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: sizes.__setitem__(name, args[0].numel() // batch))
        for name, m in quantizable_modules(denoiser).items()
    ]
    try:
        with torch.no_grad():
            denoiser(**inputs)
    finally:
        for h in handles:
            h.remove()
    return sizes


def layer_infos(denoiser: nn.Module, act_numels: Mapping[str, int], content_patterns: list[str]) -> list[LayerInfo]:
    modules = quantizable_modules(denoiser)
    groups = assign_groups(modules, content_patterns)
    return [
        LayerInfo(
            name=name,
            kind="linear" if isinstance(m, nn.Linear) else "conv",
            group=groups[name],
            weight_numel=m.weight.numel(),
            act_numel=int(act_numels.get(name, 0)),
            out_channels=m.weight.shape[0],
        )
        for name, m in modules.items()
    ]


def fingerprint(denoiser: nn.Module) -> str:
    """A hash of every quantizable layer's name and weight shape: identifies the architecture."""
    h = hashlib.sha256()
    for name, m in quantizable_modules(denoiser).items():
        h.update(f"{name}:{tuple(m.weight.shape)};".encode())
    return h.hexdigest()[:16]


class QuantModel:
    """The denoiser with every Linear/Conv2d replaced by its quantized twin (in place)."""

    def __init__(self, denoiser: nn.Module) -> None:
        self.denoiser = denoiser
        self.fingerprint = fingerprint(denoiser)
        self.layers: dict[str, QuantLayer] = {}
        for name, module in quantizable_modules(denoiser).items():
            q = module if isinstance(module, QuantLayer) else self._wrap(module)
            self.layers[name] = q
            if q is not module:
                parent_path, _, child = name[len(PREFIX):].rpartition(".")
                parent = denoiser.get_submodule(parent_path) if parent_path else denoiser
                setattr(parent, child, q)

    @staticmethod
    def _wrap(module: nn.Module) -> QuantLayer:
        return QuantLinear.from_float(module) if isinstance(module, nn.Linear) else QuantConv2d.from_float(module)

    @property
    def names(self) -> list[str]:
        return list(self.layers)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.denoiser(*args, **kwargs)

    # ------------------------------------------------------------------ bits
    def set_uniform(self, w_bits: int | None, a_bits: int | None) -> None:
        for layer in self.layers.values():
            layer.set_bits(w_bits, a_bits)

    def set_fp(self) -> None:
        self.set_uniform(None, None)

    def apply(self, weight_bits: Mapping[str, int] | None, act_bits: Mapping[str, int] | None) -> None:
        """Apply per-layer bits; a layer absent from a mapping stays floating point there."""
        weight_bits = weight_bits or {}
        act_bits = act_bits or {}
        for name, layer in self.layers.items():
            layer.set_bits(weight_bits.get(name), act_bits.get(name))

    @contextmanager
    def observing(self, momentum: float) -> Iterator[None]:
        for layer in self.layers.values():
            layer.observing, layer.momentum = True, momentum
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.observing = False

    # ------------------------------------------------------------------ checkpoint
    def quant_state(self) -> dict[str, torch.Tensor]:
        return {f"{name}::{key}": t for name, layer in self.layers.items() for key, t in layer.quant_state().items()}

    def load_quant_state(self, tensors: Mapping[str, torch.Tensor], a_symmetric: bool) -> None:
        per_layer: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.layers}
        for key, t in tensors.items():
            name, _, sub = key.partition("::")
            per_layer[name][sub] = t
        for name, layer in self.layers.items():
            layer.load_quant_state(per_layer[name], a_symmetric)
